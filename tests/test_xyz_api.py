"""X/Y/Z plot through the API, as A1111's clients call it: `script_name: "X/Y/Z plot"` with its 18 positional
`script_args` (axis types as indices into A1111's axis list); the grid first, then the cells; refusals before any
image is made."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backend.controlnet.units import parse_unit_infotext
from backend.core.infotext import parse_infotext
from backend.core.xyz_axes import XYZ_ARG_NAMES, xyz_axes
from test_scripts_api import answer, txt

T = {a.label: i for i, a in reversed(list(enumerate(xyz_axes(False))))}  # txt2img axis label -> index


def xyz_args(x_type=0, x_values="", y_type=0, y_values="", **flags) -> list:
    out = dict(x_type=x_type, x_values=x_values, x_values_dropdown=[], y_type=y_type, y_values=y_values,
               y_values_dropdown=[], z_type=0, z_values="", z_values_dropdown=[], draw_legend=True,
               include_lone_images=True, include_sub_grids=False, no_fixed_seeds=False, vary_seeds_x=False,
               vary_seeds_y=False, vary_seeds_z=False, margin_size=0, csv_mode=False)
    out.update(flags)
    return [out[name] for name in XYZ_ARG_NAMES]


def test_xyz_plot_is_listed_with_a1111s_arguments(api):
    listed = api.get("/scripts").json()
    assert "x/y/z plot" in listed["txt2img"] and "x/y/z plot" in listed["img2img"]
    infos = [i for i in api.get("/script-info").json() if i["name"] == "x/y/z plot"]
    assert sorted(i["is_img2img"] for i in infos) == [False, True]
    txt2img = next(i for i in infos if not i["is_img2img"])
    assert [a["label"] for a in txt2img["args"][:3]] == ["X type", "X values", "X values"]
    assert txt2img["args"][0]["choices"][T["Steps"]] == "Steps"
    assert len(txt2img["args"]) == len(XYZ_ARG_NAMES)


def _xyz_grid_files(server) -> set[Path]:
    return set((Path(server.data_dir) / "outputs" / "txt2img-grids").rglob("*xyz_grid*.png"))


def test_steps_by_cfg_grid_then_cells_with_their_infotexts(api, server):
    grids_before = _xyz_grid_files(server)  # the server is shared: other tests' plots may be there already
    r = api.post("/txt2img", json=txt(script_name="X/Y/Z plot", save_images=True,
                                      script_args=xyz_args(T["Steps"], "2, 3", T["CFG Scale"], "1, 9")))
    images, info = answer(r)
    assert len(images) == 5  # the grid, then the 2 x 2 cells
    grid, cells = images[0], images[1:]
    assert grid.width > 2 * 64 and grid.height > 2 * 64  # legends above and left of the cells
    texts = [parse_infotext(t) for t in info["infotexts"][1:]]
    assert [(p["Steps"], float(p["CFG scale"])) for p in texts] == [("2", 1.0), ("3", 1.0), ("2", 9.0), ("3", 9.0)]
    assert len({p["Seed"] for p in texts}) == 1  # one fixed seed for every cell
    grid_params = parse_infotext(info["infotexts"][0])
    assert grid_params["Script"] == "X/Y/Z plot" and grid_params["X Type"] == "Steps"
    assert grid_params["X Values"] == "2, 3" and grid_params["Y Type"] == "CFG Scale"
    # Each cell sits in the grid where its values are: the bottom-right cell is Steps 3, CFG 9.
    pad_left, pad_top = grid.width - 128, grid.height - 128
    corner = np.asarray(grid.crop((pad_left + 64, pad_top + 64, pad_left + 128, pad_top + 128)), dtype=np.int32)
    assert np.abs(corner - np.asarray(cells[3], dtype=np.int32)).max() <= 2
    assert np.abs(np.asarray(cells[0], dtype=np.int32) - np.asarray(cells[3], dtype=np.int32)).mean() > 1
    assert len(_xyz_grid_files(server) - grids_before) == 1  # this plot's grid, saved


def test_bad_axis_values_are_refused_before_any_image(api):
    r = api.post("/txt2img", json=txt(script_name="X/Y/Z plot",
                                      script_args=xyz_args(T["Sampler"], "Euler, Nonexistent sampler")))
    assert r.status_code == 422 and "X axis" in r.text and "Nonexistent sampler" in r.text
    r = api.post("/txt2img", json=txt(script_name="X/Y/Z plot", script_args=xyz_args(T["Steps"], "ten")))
    assert r.status_code == 422 and "ten" in r.text
    r = api.post("/txt2img", json=txt(script_name="X/Y/Z plot",
                                      script_args=xyz_args(T["Checkpoint name"], "tiny-sd1, no-such-model")))
    assert r.status_code == 422 and "Checkpoint name" in r.text and "no-such-model" in r.text
    r = api.post("/txt2img", json=txt(script_name="X/Y/Z plot", script_args=xyz_args(T["VAE"], "Automatic, nope.pt")))
    assert r.status_code == 422 and "VAE" in r.text and "nope.pt" in r.text


@pytest.fixture(scope="module")
def other_models(server):
    """A second SD 1.x checkpoint (other random weights) and a VAE file (that checkpoint's VAE) in the server's
    model folders; named after the tiny-* files, so the automatic checkpoint choice stays the same."""
    import httpx
    from safetensors.torch import load_file, save_file

    from model_factory import write_tiny_checkpoint

    ckpt = server.data_dir / "models" / "Stable-diffusion" / "xyz-sd1-b.safetensors"
    if not ckpt.exists():
        write_tiny_checkpoint(ckpt, "sd1", seed=7)
    vae = server.data_dir / "models" / "VAE" / "xyz-vae.safetensors"
    if not vae.exists():
        vae.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v for k, v in load_file(str(ckpt)).items() if k.startswith("first_stage_model.")}, str(vae))
    assert httpx.post(server.url + "/sdapi/v1/refresh-checkpoints", timeout=60).status_code == 200
    return ckpt.name, vae.name


def loads_of(server, name: str) -> int:
    """How often the backend read the checkpoint file `name` (its log line per load)."""
    return server.log_path.read_text(errors="replace").count(f"loaded {name} (")


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int32)


def test_checkpoint_axis_runs_each_cell_with_its_checkpoint(api, server, other_models):
    other, _ = other_models
    before = loads_of(server, other)
    r = api.post("/txt2img", json=txt(script_name="X/Y/Z plot", steps=1, script_args=xyz_args(
        T["Checkpoint name"], f"tiny-sd1, {other}", T["Steps"], "1, 2")))
    images, info = answer(r)
    assert len(images) == 5  # the grid, then the 2 x 2 cells (X: checkpoint, Y: steps)
    texts = [parse_infotext(t) for t in info["infotexts"][1:]]
    assert [(p["Model"], p["Steps"]) for p in texts] == [("tiny-sd1", "1"), ("xyz-sd1-b", "1"),
                                                          ("tiny-sd1", "2"), ("xyz-sd1-b", "2")]
    assert texts[0]["Model hash"] != texts[1]["Model hash"] and texts[0]["Model hash"] == texts[2]["Model hash"]
    cells = images[1:]
    assert np.abs(pixels(cells[0]) - pixels(cells[1])).mean() > 1  # other weights, other pixels
    # the checkpoint axis runs outermost: the second checkpoint was read once for its two cells
    assert loads_of(server, other) == before + 1
    grid_params = parse_infotext(info["infotexts"][0])
    assert grid_params["X Type"] == "Checkpoint name" and grid_params["Model"] == "tiny-sd1"
    # afterwards the cache is as after any job: the job's own checkpoint is still cached (limit 2), a plain
    # generation with it reads no file and gives the first cell's picture
    sd1_loads = loads_of(server, "tiny-sd1.safetensors")
    plain, plain_info = answer(api.post("/txt2img", json=txt(steps=1)))
    assert loads_of(server, "tiny-sd1.safetensors") == sd1_loads
    assert parse_infotext(plain_info["infotexts"][0])["Model"] == "tiny-sd1"
    assert np.abs(pixels(plain[0]) - pixels(cells[0])).max() <= 1


def test_vae_axis_runs_each_cell_with_its_vae(api, other_models):
    _, vae = other_models
    r = api.post("/txt2img", json=txt(script_name="X/Y/Z plot", steps=1,
                                      script_args=xyz_args(T["VAE"], f"Automatic, {vae}")))
    images, info = answer(r)
    assert len(images) == 3
    automatic, chosen = (parse_infotext(t) for t in info["infotexts"][1:])
    assert "VAE" not in automatic and chosen["VAE"] == "xyz-vae" and chosen.get("VAE hash")
    assert automatic["Model"] == chosen["Model"] == "tiny-sd1"
    assert np.abs(pixels(images[1]) - pixels(images[2])).mean() > 1  # same latents, another decoder


def test_checkpoint_axis_with_controlnet_prepares_it_for_each_checkpoint(api, server, other_models):
    """An always-on ControlNet unit acts in every cell: its hook is prepared again for each cell's checkpoint."""
    import base64
    import io

    from PIL import Image, ImageDraw

    from controlnet_factory import write_tiny_controlnet

    other, _ = other_models
    model = server.data_dir / "models" / "ControlNet" / "control_v11p_sd15_canny.pth"
    if not model.exists():
        write_tiny_controlnet(model, "sd1", seed=21)
    control = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(control).rectangle((16, 16, 47, 47), fill="white")
    buf = io.BytesIO()
    control.save(buf, format="PNG")
    unit = {"enabled": True, "image": base64.b64encode(buf.getvalue()).decode(), "module": "canny",
            "model": "control_v11p_sd15_canny", "processor_res": 64, "threshold_a": 100, "threshold_b": 200}

    def plot(weight: float):
        return answer(api.post("/txt2img", json=txt(
            script_name="X/Y/Z plot", steps=1, script_args=xyz_args(T["Checkpoint name"], f"tiny-sd1, {other}"),
            alwayson_scripts={"controlnet": {"args": [dict(unit, weight=weight)]}})))

    controlled, info = plot(1.0)
    plain, _ = plot(0.0)
    texts = [parse_infotext(t) for t in info["infotexts"][1:3]]
    assert [p["Model"] for p in texts] == ["tiny-sd1", "xyz-sd1-b"]
    assert all(p["ControlNet 0"].startswith("Module: canny") for p in texts)
    for with_unit, without in zip(controlled[1:3], plain[1:3]):  # both cells, either checkpoint
        assert np.abs(pixels(with_unit) - pixels(without)).mean() > 1


def test_checkpoint_axis_applies_the_prompts_loras_to_each_checkpoint(api, server, other_models):
    """The prompt's LoRA is applied to the checkpoint a cell switches to (the same prompt as the cell before)."""
    from lora_factory import save_lora, simple_lora

    other, _ = other_models
    save_lora(server.data_dir / "models" / "Lora" / "xyz_lora.safetensors", simple_lora("sd1", seed=31), family="sd1")
    assert api.post("/refresh-loras").status_code == 200

    def plot(prompt: str):
        return answer(api.post("/txt2img", json=txt(script_name="X/Y/Z plot", prompt=prompt, script_args=xyz_args(
            T["Checkpoint name"], f"tiny-sd1, {other}"))))

    with_lora, info = plot("a red boat <lora:xyz_lora:0.9>")
    plain, _ = plot("a red boat")
    texts = [parse_infotext(t) for t in info["infotexts"][1:]]
    assert [p["Model"] for p in texts] == ["tiny-sd1", "xyz-sd1-b"]
    assert all(p["Lora hashes"].startswith("xyz_lora: ") for p in texts)
    for a, b in zip(with_lora[1:3], plain[1:3]):  # either checkpoint: the LoRA changed its picture
        assert np.abs(pixels(a) - pixels(b)).mean() > 1


def test_img2img_checkpoint_axis(api, other_models):
    from test_api_img2img import body, picture

    other, _ = other_models
    img2img_axes = {a.label: i for i, a in reversed(list(enumerate(xyz_axes(True))))}
    r = api.post("/img2img", json=body(picture(), steps=2, script_name="X/Y/Z plot", script_args=xyz_args(
        img2img_axes["Checkpoint name"], f"tiny-sd1, {other}")))
    images, info = answer(r)
    assert len(images) == 3
    assert [parse_infotext(t)["Model"] for t in info["infotexts"][1:]] == ["tiny-sd1", "xyz-sd1-b"]
    assert np.abs(pixels(images[1]) - pixels(images[2])).mean() > 1


def test_sampler_axis_runs_each_sampler_the_app_resolved(api):
    r = api.post("/txt2img", json=txt(script_name="X/Y/Z plot",
                                      script_args=xyz_args(T["Sampler"], "Euler, DPM++ 2M, Euler a")))
    images, info = answer(r)
    assert len(images) == 4
    texts = [parse_infotext(t) for t in info["infotexts"][1:]]
    assert [p["Sampler"] for p in texts] == ["Euler", "DPM++ 2M", "Euler a"]
    pixels = [np.asarray(im, dtype=np.int32) for im in images[1:]]
    assert (pixels[0] != pixels[2]).any()  # Euler a adds noise each step: not Euler's picture (tiny model: close)


def _canny_unit(server, **fields) -> dict:
    import base64
    import io

    from PIL import Image, ImageDraw

    from controlnet_factory import write_tiny_controlnet

    model = server.data_dir / "models" / "ControlNet" / "control_v11p_sd15_canny.pth"
    if not model.exists():
        write_tiny_controlnet(model, "sd1", seed=21)
    control = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(control).rectangle((16, 16, 47, 47), fill="white")
    buf = io.BytesIO()
    control.save(buf, format="PNG")
    return {"enabled": True, "image": base64.b64encode(buf.getvalue()).decode(), "module": "canny",
            "model": "control_v11p_sd15_canny", "processor_res": 64, "threshold_a": 100, "threshold_b": 200,
            **fields}


CN_AXES = [f"[ControlNet] {n}" for n in ("Enabled", "Model", "Weight", "Guidance Start", "Guidance End", "Control Mode",
                                          "Resize Mode", "Preprocessor", "Pre Resolution", "Pre Threshold A",
                                          "Pre Threshold B")]


def test_controlnet_axes_follow_a1111s_axes(api):
    """The ControlNet extension adds its axes after A1111's (whose indices stay), in both tabs."""
    for info in (i for i in api.get("/script-info").json() if i["name"] == "x/y/z plot"):
        builtin = [a.label for a in xyz_axes(info["is_img2img"])]  # A1111's, then Forge's Distilled CFG Scale
        for arg in (info["args"][0], info["args"][3], info["args"][6]):  # X, Y and Z type
            assert arg["choices"] == builtin[:-1] + CN_AXES + ["Distilled CFG Scale"]


def test_controlnet_weight_axis_makes_each_cell_with_its_weight(api, server):
    unit = _canny_unit(server)
    weight_axis = T["Size"] + 1 + CN_AXES.index("[ControlNet] Weight")  # right after A1111's list
    r = api.post("/txt2img", json=txt(script_name="X/Y/Z plot", script_args=xyz_args(weight_axis, "0, 0.5, 1.5"),
                                      alwayson_scripts={"controlnet": {"args": [unit]}}))
    images, info = answer(r)
    assert len(info["infotexts"]) == 4  # the grid, the cells (then ControlNet's detected map, as A1111's)
    grid = parse_infotext(info["infotexts"][0])
    assert grid["X Type"] == "[ControlNet] Weight" and grid["X Values"] == "0, 0.5, 1.5"
    units = [parse_unit_infotext(parse_infotext(t)["ControlNet 0"]) for t in info["infotexts"][1:]]
    assert [u["weight"] for u in units] == [0, 0.5, 1.5] and all(u["module"] == "canny" for u in units)
    cells = [pixels(im) for im in images[1:4]]
    assert np.abs(cells[0] - cells[2]).mean() > 1 and np.abs(cells[1] - cells[2]).mean() > 0.5
    # the axis by its label, a second ControlNet axis on Y: every cell's unit has both values
    r = api.post("/txt2img", json=txt(script_name="X/Y/Z plot", script_args=xyz_args(
        "[ControlNet] Weight", "0, 1", "[ControlNet] Guidance End", "0.5, 1"),
        alwayson_scripts={"controlnet": {"args": [unit]}}))
    images, info = answer(r)
    units = [parse_unit_infotext(parse_infotext(t)["ControlNet 0"]) for t in info["infotexts"][1:]]
    assert [(u["weight"], u["guidance_end"]) for u in units] == [(0, 0.5), (1, 0.5), (0, 1), (1, 1)]
    # Enabled off: that cell has no ControlNet (its infotext no unit), the other has it
    r = api.post("/txt2img", json=txt(script_name="X/Y/Z plot", script_args=xyz_args(
        "[ControlNet] Enabled", "True, False"), alwayson_scripts={"controlnet": {"args": [unit]}}))
    images, info = answer(r)
    texts = [parse_infotext(t) for t in info["infotexts"][1:]]
    assert "ControlNet 0" in texts[0] and "ControlNet 0" not in texts[1]
    assert np.abs(pixels(images[1]) - pixels(images[2])).mean() > 1


def test_controlnet_axis_values_the_extension_refuses_are_422(api, server):
    unit = _canny_unit(server)
    weight_axis = T["Size"] + 1 + CN_AXES.index("[ControlNet] Weight")  # right after A1111's list
    r = api.post("/txt2img", json=txt(script_name="X/Y/Z plot", script_args=xyz_args(weight_axis, "1, 3"),
                                      alwayson_scripts={"controlnet": {"args": [unit]}}))
    assert r.status_code == 422 and "[ControlNet] Weight" in r.text and "3.0" in r.text and "weight" in r.text
    r = api.post("/txt2img", json=txt(script_name="X/Y/Z plot", script_args=xyz_args(
        "[ControlNet] Model", "control_v11p_sd15_canny, no_such_controlnet"),
        alwayson_scripts={"controlnet": {"args": [unit]}}))
    assert r.status_code == 422 and "[ControlNet] Model" in r.text and "no_such_controlnet" in r.text, r.text


def test_controlnet_weight_axis_with_checkpoint_axis(api, server, other_models):
    """Checkpoint name (outermost: a switch re-prepares the job's units) by [ControlNet] Weight: every cell has its
    checkpoint and its weight, and the weight changes the picture for either checkpoint."""
    other, _ = other_models
    unit = _canny_unit(server)
    r = api.post("/txt2img", json=txt(script_name="X/Y/Z plot", script_args=xyz_args(
        T["Checkpoint name"], f"tiny-sd1, {other}", "[ControlNet] Weight", "0, 1.5"),
        alwayson_scripts={"controlnet": {"args": [unit]}}))
    images, info = answer(r)
    texts = [parse_infotext(t) for t in info["infotexts"][1:5]]
    assert [(p["Model"], parse_unit_infotext(p["ControlNet 0"])["weight"]) for p in texts] == [
        ("tiny-sd1", 0), ("xyz-sd1-b", 0), ("tiny-sd1", 1.5), ("xyz-sd1-b", 1.5)]
    cells = [pixels(im) for im in images[1:5]]
    assert np.abs(cells[0] - cells[2]).mean() > 1 and np.abs(cells[1] - cells[3]).mean() > 1
    assert np.abs(cells[0] - cells[1]).mean() > 1  # the two checkpoints
