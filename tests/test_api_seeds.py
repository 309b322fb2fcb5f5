"""Seeds through the API as AUTOMATIC1111 makes them: the random number source (`randn_source`), the eta noise seed
delta (ENSD), the sampler knobs s_churn/s_tmin/s_tmax/s_noise, and what the infotext says about them."""
from __future__ import annotations

import json

import numpy as np

from backend.core.infotext import infotext_to_request_fields, parse_infotext
from tests.test_api_txt2img import images_of, pixels, small


def generate(api, sampler="Euler a", **settings_and_fields):
    overrides = {k: settings_and_fields.pop(k) for k in list(settings_and_fields)
                 if k in ("randn_source", "eta_noise_seed_delta")}
    body = small(sampler_name=sampler, seed=4242, steps=4, **settings_and_fields)
    body["override_settings"] = {**body["override_settings"], **overrides}
    r = api.post("/txt2img", json=body)
    assert r.status_code == 200, r.text
    text = json.loads(r.json()["info"])["infotexts"][0]
    return pixels(images_of(r)[0]), dict(parse_infotext(text), text=text)


def test_randn_source_gpu_is_the_cpu_generator_here_and_nv_differs(api):
    gpu, gpu_info = generate(api, randn_source="GPU")
    cpu, cpu_info = generate(api, randn_source="CPU")
    nv, nv_info = generate(api, randn_source="NV")
    nv_again, _ = generate(api, randn_source="NV")
    assert np.array_equal(gpu, cpu)  # no GPU: A1111's "GPU" source is torch's CPU generator
    assert not np.array_equal(nv, cpu)
    assert np.array_equal(nv, nv_again)  # reproducible
    assert "RNG:" not in gpu_info["text"]  # the default source is not written
    assert cpu_info["RNG"] == "CPU" and nv_info["RNG"] == "NV"


def test_infotext_writes_rng_only_when_not_gpu(api):
    r = api.post("/txt2img", json=small(seed=5, steps=2))
    text = json.loads(r.json()["info"])["infotexts"][0]
    assert "RNG:" not in text and "ENSD:" not in text
    body = small(seed=5, steps=2)
    body["override_settings"].update(randn_source="NV", eta_noise_seed_delta=31337)
    text = json.loads(api.post("/txt2img", json=body).json()["info"])["infotexts"][0]
    assert "ENSD: 31337" in text and "RNG: NV" in text
    fields = infotext_to_request_fields(parse_infotext(text))  # pasted back: the settings, as A1111 maps them
    assert fields["override_settings"]["randn_source"] == "NV"
    assert fields["override_settings"]["eta_noise_seed_delta"] == 31337


def test_ensd_changes_an_ancestral_sampler_but_not_euler(api):
    a_plain, a_info = generate(api, "Euler a")
    a_ensd, a_ensd_info = generate(api, "Euler a", eta_noise_seed_delta=31337)
    assert not np.array_equal(a_plain, a_ensd)
    assert a_ensd_info["ENSD"] == "31337" and "ENSD" not in a_info["text"]
    e_plain, _ = generate(api, "Euler")
    e_ensd, e_info = generate(api, "Euler", eta_noise_seed_delta=31337)
    assert np.array_equal(e_plain, e_ensd)
    assert "ENSD" not in e_info["text"]  # A1111 writes it only for samplers that use it


def test_sigma_churn_from_the_request_changes_euler_and_is_written(api):
    plain, plain_info = generate(api, "Euler")
    churned, info = generate(api, "Euler", s_churn=2.0, s_noise=0.9)
    assert not np.array_equal(plain, churned)
    assert info["Sigma churn"] == "2" and info["Sigma noise"] == "0.9"
    assert "Sigma churn" not in plain_info["text"]
    again, _ = generate(api, "Euler", s_churn=2.0, s_noise=0.9)
    assert np.array_equal(churned, again)
    # a knob outside a window that contains no step: as if there were no churn (s_tmax 0 means no upper bound)
    windowless, _ = generate(api, "Euler", s_churn=2.0, s_tmin=50.0, s_tmax=0)
    assert np.array_equal(windowless, plain)


def test_sigma_settings_are_options_with_a1111_keys(api):
    opts = api.get("/options").json()
    assert opts["randn_source"] == "GPU" and opts["eta_noise_seed_delta"] == 0
    assert (opts["s_churn"], opts["s_tmin"], opts["s_tmax"], opts["s_noise"]) == (0.0, 0.0, 0.0, 1.0)
    r = api.post("/txt2img", json=small(override_settings={"sd_model_checkpoint": "tiny-sd1.safetensors",
                                                           "randn_source": "XPU"}))
    assert r.status_code in (400, 422), r.text


def test_sde_samplers_draw_a_brownian_tree_per_seed_that_ensd_leaves_alone(api):
    plain, _ = generate(api, "DPM++ 2M SDE")
    ensd, info = generate(api, "DPM++ 2M SDE", eta_noise_seed_delta=31337)
    assert np.array_equal(plain, ensd)  # A1111's tree is seeded with the image's seed
    assert "ENSD" not in info["text"]
    other, _ = generate(api, "DPM++ 2M SDE", randn_source="NV")
    assert not np.array_equal(plain, other)  # the initial noise still follows the source
    r = api.post("/txt2img", json=small(sampler_name="DPM++ SDE", seed=4242, steps=4, batch_size=2))
    alone = api.post("/txt2img", json=small(sampler_name="DPM++ SDE", seed=4243, steps=4))
    second, single = pixels(images_of(r)[1]), pixels(images_of(alone)[0])
    diff = np.abs(second - single)  # image 2 of a batch is its seed alone (batched matmuls round differently)
    assert diff.max() <= 3 and diff.mean() < 0.05, (diff.max(), diff.mean())


def test_img2img_and_hires_fix_with_an_sde_sampler_are_reproducible(api):
    """The cut schedules of img2img and hires. fix: the Brownian trees span the whole schedule's top (A1111)."""
    from tests.test_api_img2img import body, images_of as img2img_images, picture, px
    req = body(picture(), sampler_name="DPM++ 2M SDE", steps=5, denoising_strength=0.6)
    first = px(img2img_images(api.post("/img2img", json=req))[0])
    again = px(img2img_images(api.post("/img2img", json=req))[0])
    assert np.array_equal(first, again)
    req["override_settings"]["eta_noise_seed_delta"] = 31337
    assert np.array_equal(first, px(img2img_images(api.post("/img2img", json=req))[0]))
    hires = small(sampler_name="DPM++ SDE", seed=9, steps=3, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=3,
                  denoising_strength=0.5, hr_upscaler="Latent")
    a, b = (pixels(images_of(api.post("/txt2img", json=hires))[0]) for _ in range(2))
    assert a.shape == (96, 96, 3) and np.array_equal(a, b)
