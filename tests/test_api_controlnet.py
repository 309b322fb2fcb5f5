"""sd-webui-controlnet's API on the real server: /controlnet/* routes and units in alwayson_scripts."""
from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from controlnet_factory import write_tiny_controlnet


def b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def drawn() -> Image.Image:
    img = Image.new("RGB", (128, 96), "black")
    ImageDraw.Draw(img).rectangle((32, 24, 95, 71), fill="white")
    return img


@pytest.fixture(scope="module")
def cn(server):
    folder = server.data_dir / "models" / "ControlNet"
    write_tiny_controlnet(folder / "control_v11p_sd15_canny.pth", "sd1", seed=21)
    write_tiny_controlnet(folder / "control_v11f1p_sd15_depth_fp16.safetensors", "sd1", seed=22)
    write_tiny_controlnet(folder / "diffusers_xl_canny_full.safetensors", "sdxl", layout="diffusers", seed=23)
    with httpx.Client(base_url=server.url, timeout=600) as client:
        yield client


def body(**kw) -> dict:
    b = {"prompt": "a red house", "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 7,
         "seed": 99, "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors"}}
    b.update(kw)
    return b


def units(*us) -> dict:
    return {"controlnet": {"args": list(us)}}


def pixels(data: str) -> np.ndarray:
    return np.asarray(decode(data).convert("RGB")).astype(np.int32)


def test_version_module_and_model_lists(cn):
    assert cn.get("/controlnet/version").json() == {"version": 2}
    modules = cn.get("/controlnet/module_list").json()
    assert modules["module_list"][:3] == ["none", "invert", "canny"]
    assert {"hed", "lineart", "shuffle", "color", "lineart_standard", "blur_gaussian", "tile_resample"} <= set(modules["module_list"])
    canny = modules["module_detail"]["canny"]
    assert canny["model_free"] is True
    assert [s["name"] for s in canny["sliders"]] == ["Preprocessor Resolution", "Canny Low Threshold", "Canny High Threshold"]
    assert canny["sliders"][1]["value"] == 100 and canny["sliders"][2]["value"] == 200
    aliases = cn.get("/controlnet/module_list", params={"alias_names": True}).json()["module_list"]
    assert "invert (from white bg & black line)" in aliases and "softedge_hed" in aliases
    models = cn.get("/controlnet/model_list").json()["model_list"]
    names = [m.split(" [")[0] for m in models]
    assert {"control_v11p_sd15_canny", "control_v11f1p_sd15_depth_fp16", "diffusers_xl_canny_full"} <= set(names)
    assert all(m.endswith("]") and len(m.split(" [")[1]) == 9 for m in models)
    types = cn.get("/controlnet/control_types").json()["control_types"]
    assert "canny" in types["Canny"]["module_list"]
    # the same rules as the UI's Control Type radio (backend.core.control_types): labels, filters, defaults
    from backend.core import control_types as ct
    assert list(types) == ct.control_type_names() and "Tile" not in types
    assert types["Canny"]["module_list"] == ct.modules_for("Canny") and types["Canny"]["default_option"] == "canny"
    assert types["Canny"]["default_model"].startswith("control_v11p_sd15_canny")
    assert all("canny" in m.lower() for m in types["Canny"]["model_list"] if m != "None")
    assert cn.get("/controlnet/settings").json()["control_net_unit_count"] == 3


def test_detect_canny(cn):
    r = cn.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [b64(drawn())],
                                            "controlnet_processor_res": 96, "controlnet_threshold_a": 100,
                                            "controlnet_threshold_b": 200})
    assert r.status_code == 200, r.text
    assert r.json()["info"] == "Success"
    out = np.asarray(decode(r.json()["images"][0]).convert("L"))
    assert out.shape == (96, 128)
    assert out[30:66, 30:34].max() == 255 and out[35:60, 45:85].max() == 0
    bad = cn.post("/controlnet/detect", json={"controlnet_module": "nope", "controlnet_input_images": [b64(drawn())]})
    assert bad.status_code == 400 and "Unknown ControlNet preprocessor" in bad.json()["detail"]
    missing = cn.post("/controlnet/detect", json={"controlnet_module": "lineart", "controlnet_input_images": [b64(drawn())]})
    assert missing.status_code == 424 and "sk_model.pth" in missing.json()["detail"]
    assert "ControlNet-annotators" in missing.json()["detail"]


def test_txt2img_with_units_as_extension_clients_send_them(cn, api):
    plain = api.post("/txt2img", json=body())
    assert plain.status_code == 200, plain.text
    unit = {"enabled": True, "image": b64(drawn()), "module": "canny", "model": "control_v11p_sd15_canny",
            "weight": 1.0, "resize_mode": 1, "processor_res": 96, "threshold_a": 100, "threshold_b": 200,
            "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": 0, "pixel_perfect": False, "low_vram": False}
    r = api.post("/txt2img", json=body(alwayson_scripts=units(unit)))
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert len(images) == 2  # the image, then the detected map (as the extension appends it)
    assert decode(images[0]).size == (64, 64) and decode(images[1]).size == (128, 96)
    assert np.abs(pixels(images[0]) - pixels(plain.json()["images"][0])).mean() > 1
    info = json.loads(r.json()["info"])
    text = info["infotexts"][0]
    assert 'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [' in text
    assert "Processor Res: 96, Threshold A: 100, Threshold B: 200" in text
    assert info["extra_generation_params"]["ControlNet 0"].startswith("Module: canny")
    # the request echo keeps what the client sent
    assert r.json()["parameters"]["alwayson_scripts"]["controlnet"]["args"][0]["module"] == "canny"

    zero = api.post("/txt2img", json=body(alwayson_scripts=units(dict(unit, weight=0))))
    off = api.post("/txt2img", json=body(alwayson_scripts=units(dict(unit, enabled=False))))
    assert np.array_equal(pixels(zero.json()["images"][0]), pixels(plain.json()["images"][0]))
    assert np.array_equal(pixels(off.json()["images"][0]), pixels(plain.json()["images"][0]))
    assert len(off.json()["images"]) == 1

    second = dict(unit, module="none", model="control_v11f1p_sd15_depth_fp16", weight=0.6, control_mode="ControlNet is more important")
    two = api.post("/txt2img", json=body(alwayson_scripts=units(unit, second)))
    assert two.status_code == 200, two.text
    t2 = json.loads(two.json()["info"])["infotexts"][0]
    assert "ControlNet 0:" in t2 and "ControlNet 1:" in t2 and "Control Mode: ControlNet is more important" in t2
    assert np.abs(pixels(two.json()["images"][0]) - pixels(images[0])).mean() > 0.5


def test_bad_units_give_clear_errors_and_warnings(cn, api):
    img = b64(drawn())
    r = api.post("/txt2img", json=body(alwayson_scripts=units({"module": "cany", "model": "control_v11p_sd15_canny", "image": img})))
    assert r.status_code == 400 and "ControlNet unit 0: Unknown ControlNet preprocessor 'cany'" in r.json()["detail"]
    r = api.post("/txt2img", json=body(alwayson_scripts=units({"module": "canny", "model": "control_nope", "image": img})))
    assert r.status_code == 404 and "ControlNet model 'control_nope' not found" in r.json()["detail"]
    r = api.post("/txt2img", json=body(alwayson_scripts=units({"module": "canny", "model": "control_v11p_sd15_canny"})))
    assert r.status_code == 400 and "no control image" in r.json()["detail"]
    r = api.post("/txt2img", json=body(alwayson_scripts=units({"module": "canny", "model": "control_v11p_sd15_canny",
                                                               "image": img, "weight": 5})))
    assert r.status_code == 400 and "weight must be between 0 and 2" in r.json()["detail"]
    # a model for SDXL with an SD 1.x checkpoint, and a unit with start > end: warnings, the other unit goes on
    good = {"module": "canny", "model": "control_v11p_sd15_canny", "image": img, "processor_res": 96}
    r = api.post("/txt2img", json=body(alwayson_scripts=units(
        {"module": "canny", "model": "diffusers_xl_canny_full", "image": img, "processor_res": 96},
        dict(good, guidance_start=0.9, guidance_end=0.2), good)))
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    warnings = " ".join(info["warnings"])
    assert "ControlNet unit 0" in warnings and "SDXL" in warnings and "ControlNet unit 1" in warnings
    alone = api.post("/txt2img", json=body(alwayson_scripts=units(good)))
    assert np.array_equal(pixels(r.json()["images"][0]), pixels(alone.json()["images"][0]))


def test_img2img_and_inpaint_with_a_unit_using_the_init_image(cn, api):
    init = Image.new("RGB", (64, 64), (40, 90, 160))
    ImageDraw.Draw(init).rectangle((16, 16, 47, 47), fill=(230, 220, 40))
    base = {"prompt": "a box", "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 5,
            "denoising_strength": 0.8, "init_images": [b64(init)],
            "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors"}}
    unit = {"module": "canny", "model": "control_v11p_sd15_canny", "processor_res": 64}  # no image: the init image
    plain = api.post("/img2img", json=base)
    with_cn = api.post("/img2img", json=dict(base, alwayson_scripts=units(unit)))
    assert plain.status_code == 200 and with_cn.status_code == 200, with_cn.text
    assert np.abs(pixels(with_cn.json()["images"][0]) - pixels(plain.json()["images"][0])).mean() > 1
    assert "ControlNet 0" in json.loads(with_cn.json()["info"])["infotexts"][0]
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)
    inpaint = api.post("/img2img", json=dict(base, mask=b64(mask), mask_blur=0, alwayson_scripts=units(unit)))
    assert inpaint.status_code == 200, inpaint.text
    out = pixels(inpaint.json()["images"][0])
    assert np.array_equal(out[:, 40:], np.asarray(init, dtype=np.int32)[:, 40:])  # outside the mask: unchanged
    assert np.abs(out[:, :28] - np.asarray(init, dtype=np.int32)[:, :28]).mean() > 1


def test_img2img_folder_batch_uses_each_file_as_the_control_image(cn, api, server):
    folder, out = server.data_dir / "cn-batch-in", server.data_dir / "cn-batch-out"
    folder.mkdir(exist_ok=True)
    files = {}
    for name, box in (("a", (8, 8, 30, 56)), ("b", (30, 10, 60, 30))):
        img = Image.new("RGB", (64, 64), (40, 90, 160))
        ImageDraw.Draw(img).rectangle(box, fill=(230, 220, 40))
        img.save(folder / f"{name}.png")
        files[name] = img
    base = {"prompt": "a box", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 5,
            "denoising_strength": 0.8, "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors"},
            "alwayson_scripts": units({"module": "canny", "model": "control_v11p_sd15_canny", "processor_res": 64})}
    r = api.post("/img2img-batch", json=dict(base, init_images=[], input_dir=str(folder), output_dir=str(out)))
    assert r.status_code == 200, r.text
    written = sorted(out.glob("*.png"))
    assert len(written) == 2 and all("ControlNet 0" in Image.open(p).text["parameters"] for p in written)
    for path, name in zip(written, ("a", "b")):  # each equals a single img2img of that file, its own edges as control
        single = api.post("/img2img", json=dict(base, init_images=[b64(files[name])]))
        assert single.status_code == 200, single.text
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB"), dtype=np.int32),
                              pixels(single.json()["images"][0])), name


def test_inpaint_only_unit_takes_the_img2img_mask(cn, api):
    init = Image.new("RGB", (64, 64), (40, 90, 160))
    ImageDraw.Draw(init).rectangle((16, 16, 47, 47), fill=(230, 220, 40))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)
    base = {"prompt": "a box", "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 5,
            "denoising_strength": 0.8, "init_images": [b64(init)], "mask": b64(mask), "mask_blur": 0,
            "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors"}}
    assert "inpaint_only" in cn.get("/controlnet/module_list").json()["module_list"]

    def run(module):
        r = api.post("/img2img", json=dict(base, alwayson_scripts=units({"module": module, "model": "control_v11p_sd15_canny"})))
        assert r.status_code == 200, r.text
        return r.json()

    plain_hint, inpaint_hint = run("none"), run("inpaint_only")
    info = json.loads(inpaint_hint["info"])
    assert 'Module: inpaint_only' in info["infotexts"][0] and not info.get("warnings")
    out, plain = pixels(inpaint_hint["images"][0]), pixels(plain_hint["images"][0])
    # the mask reached the hint: the masked half differs from a run whose hint is the whole picture
    assert np.abs(out[:, :28] - plain[:, :28]).mean() > 0.1  # (the tiny random ControlNet has a small effect)
    assert np.array_equal(out[:, 40:], np.asarray(init, dtype=np.int32)[:, 40:])  # outside the mask: unchanged
    detected = decode(inpaint_hint["images"][1]).convert("RGB")  # the map shows the masked part black
    assert np.asarray(detected)[:, :28].max() == 0 and np.asarray(detected)[:, 40:].max() > 0
    # in txt2img with no mask anywhere: a warning, and the image is still made
    r = api.post("/txt2img", json=body(alwayson_scripts=units({"module": "inpaint_only", "model": "control_v11p_sd15_canny",
                                                                 "image": b64(init)})))
    assert r.status_code == 200 and "needs a mask" in " ".join(json.loads(r.json()["info"])["warnings"])


def test_img2img_folder_batch_gives_each_files_mask_to_inpaint_units(cn, api, server):
    folder, masks, out = (server.data_dir / n for n in ("cn-inp-in", "cn-inp-masks", "cn-inp-out"))
    for f in (folder, masks):
        f.mkdir(exist_ok=True)
    Image.new("RGB", (64, 64), (40, 90, 160)).save(folder / "a.png")
    Image.new("RGB", (64, 64), (160, 90, 40)).save(folder / "b.png")
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)
    mask.save(masks / "a.png")  # b.png has no mask: its inpaint unit warns
    r = api.post("/img2img-batch", json={
        "prompt": "a box", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 5, "mask_blur": 0,
        "init_images": [], "input_dir": str(folder), "output_dir": str(out), "mask_dir": str(masks),
        "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors"},
        "alwayson_scripts": units({"module": "inpaint_only", "model": "control_v11p_sd15_canny"})})
    assert r.status_code == 200, r.text
    warnings = [w for w in json.loads(r.json()["info"])["warnings"] if "needs a mask" in w]
    assert len(warnings) == 1, warnings  # only for b.png
    assert len(list(out.glob("*.png"))) == 2
