"""X/Y/Z plot: the axis list in A1111's order, the value syntax and its refusals (backend/core/xyz_axes.py), the
grids with legends (backend/core/grid_legends.py) and the runner (backend/engine/scripts/xyz_plot.py) with a fake
generation whose solid colours encode each cell's values, and once through the real txt2img pipeline on the tiny
SD 1.x model."""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from backend.core.errors import UserError
from backend.core.grid_legends import GridAnnotation, draw_grid_annotations, layout_grid
from backend.core.images import encode_png
from backend.core.infotext import parse_infotext
from backend.core.schemas import GeneratedImage, GenerationResult, Img2ImgRequest, Txt2ImgRequest
from backend.core.xyz_axes import XYZ_ARG_NAMES, XYZCatalogs, parse_xyz_args, xyz_arg_specs, xyz_axes
from backend.engine.scripts import xyz_plot
from backend.engine.scripts.xyz_plot import ScriptJob

T = {a.label: i for i, a in reversed(list(enumerate(xyz_axes(False))))}  # txt2img label -> index
I = {a.label: i for i, a in reversed(list(enumerate(xyz_axes(True))))}  # img2img label -> index
CELL = 32


def req(**kw) -> Txt2ImgRequest:
    body = dict(prompt="a red house, big tree", negative_prompt="blurry", steps=10, cfg_scale=7, seed=5,
                width=64, height=64)
    body.update(kw)
    return Txt2ImgRequest(**body)


def args(x_type=0, x_values="", y_type=0, y_values="", z_type=0, z_values="", **flags) -> list:
    out = dict(x_type=x_type, x_values=x_values, x_values_dropdown=[], y_type=y_type, y_values=y_values,
               y_values_dropdown=[], z_type=z_type, z_values=z_values, z_values_dropdown=[], draw_legend=True,
               include_lone_images=False, include_sub_grids=False, no_fixed_seeds=False, vary_seeds_x=False,
               vary_seeds_y=False, vary_seeds_z=False, margin_size=0, csv_mode=False)
    out.update(flags)
    return [out[name] for name in XYZ_ARG_NAMES]


def values(x_type, text, request=None, **kw):
    return parse_xyz_args(args(x_type, text), request or req(), **kw).x.values


# --- the axis list -------------------------------------------------------------------------------------------------

def test_axis_indices_are_a1111s_for_each_tab():
    txt = [a.label for a in xyz_axes(False)]
    assert txt[:12] == ["Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "Hires steps", "CFG Scale",
                        "Prompt S/R", "Prompt order", "Sampler", "Hires sampler", "Checkpoint name"]
    assert txt.index("Schedule type") == 17 and txt.index("Clip skip") == 24 and txt.index("VAE") == 29
    assert txt.index("Denoising") == 25 and txt.index("Hires upscaler") == 28 and txt[-2] == "Size"
    img = [a.label for a in xyz_axes(True)]
    assert img[:11] == ["Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "CFG Scale", "Image CFG Scale",
                        "Prompt S/R", "Prompt order", "Sampler", "Checkpoint name"]
    assert "Hires steps" not in img and "Cond. Image Mask Weight" in img and "Cond. Image Mask Weight" not in txt
    assert txt[-1] == img[-1] == "Distilled CFG Scale"  # Forge's, after A1111's list
    assert len(txt) == 43 and len(img) == 42
    # an extension's axis keeps the index it has in A1111 (right after Size); Forge's comes after it
    from backend.core.xyz_axes import FLOAT, AxisType
    with_ext = [a.label for a in xyz_axes(False, (AxisType("[ControlNet] Weight", FLOAT, script="controlnet"),))]
    assert with_ext[41:] == ["Size", "[ControlNet] Weight", "Distilled CFG Scale"]


def test_unsupported_axis_is_refused_by_name_not_shifted():
    with pytest.raises(UserError) as err:
        parse_xyz_args(args(T["Schedule rho"], "0-1"), req())
    assert "Schedule rho" in err.value.message and "not supported in Easel" in err.value.message
    assert 400 <= err.value.status < 500
    with pytest.raises(UserError, match="not an axis index"):
        parse_xyz_args(args(99, "1"), req())
    # the index after an unsupported one is still A1111's: 13 is Sigma Churn
    assert parse_xyz_args(args(13, "0, 1"), req()).x.type.label == "Sigma Churn"


def test_arg_specs_follow_script_args():
    specs = xyz_arg_specs(False)
    assert [s.key for s in specs] == list(XYZ_ARG_NAMES) and len(specs) == 18
    assert specs[0].label == "X type" and specs[0].default == "Seed" and specs[0].choices[4] == "Steps"
    assert specs[3].default == "Nothing" and specs[9].label == "Draw legend" and specs[9].default is True
    margin = specs[16].info()
    assert margin["label"] == "Grid margins (px)" and margin["maximum"] == 500 and margin["step"] == 2
    assert xyz_arg_specs(True)[0].choices[6] == "Image CFG Scale"


# --- values --------------------------------------------------------------------------------------------------------

def test_int_ranges_increments_and_counts():
    assert values(T["Steps"], "1-5") == (1, 2, 3, 4, 5)
    assert values(T["Steps"], "1-5 (+2)") == (1, 3, 5)
    assert values(T["Steps"], "10-1 (-3)") == (10, 7, 4)
    assert values(T["Steps"], "1-10 [5]") == (1, 3, 5, 7, 10)
    assert values(T["Steps"], "3, 8-9, 20") == (3, 8, 9, 20)


def test_float_ranges_and_lists():
    assert values(T["CFG Scale"], "1-2 (+0.5)") == (1.0, 1.5, 2.0)
    assert values(T["CFG Scale"], "0-1 [5]") == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert values(T["CFG Scale"], "3, 5.5,7") == (3.0, 5.5, 7.0)
    plan = parse_xyz_args(args(T["CFG Scale"], "3, 5.5"), req())
    assert plan.x.labels == ("CFG Scale: 3.0", "CFG Scale: 5.5")


def test_csv_quotes_prompt_sr_and_order():
    r = req(prompt="a red house, big tree")
    assert values(T["Prompt S/R"], 'red, "green, bright", blue', r) == ("red", "green, bright", "blue")
    with pytest.raises(UserError) as err:
        values(T["Prompt S/R"], "purple, red", r)
    assert "X axis (Prompt S/R)" in err.value.message and "'purple'" in err.value.message
    order = parse_xyz_args(args(T["Prompt order"], "red, big"), r).x
    assert order.values == (("red", "big"), ("big", "red")) and order.labels == ("red, big", "big, red")


def test_bad_values_name_axis_and_value():
    with pytest.raises(UserError) as err:
        parse_xyz_args(args(T["Seed"], "1", T["Steps"], "5, ten"), req())
    assert "Y axis (Steps)" in err.value.message and "'ten'" in err.value.message
    with pytest.raises(UserError) as err:
        values(T["CFG Scale"], "1.5, x")
    assert "X axis (CFG Scale)" in err.value.message and "'x'" in err.value.message
    with pytest.raises(UserError) as err:  # the request checks, before any image
        values(T["Steps"], "10, 5000")
    assert "5000" in err.value.message and "steps" in err.value.message
    with pytest.raises(UserError, match="increment must not be 0"):
        values(T["CFG Scale"], "1-2 (+0)")
    with pytest.raises(UserError, match="at most 1000"):
        values(T["Seed"], "1-100000000")
    with pytest.raises(UserError, match="has no values"):
        values(T["Steps"], "")
    with pytest.raises(UserError, match="max_images_per_job"):
        parse_xyz_args(args(T["Steps"], "1-5", T["CFG Scale"], "1-5"), req(batch_size=2), max_images=20)


def test_dropdown_axes_against_catalogs():
    cat = XYZCatalogs(checkpoints=("sub/anime.safetensors [0123abcd]", "base.ckpt [ffff0000]"),
                      vaes=("kl-f8.safetensors",), upscalers=("R-ESRGAN 4x+",))
    assert values(T["Sampler"], "euler a, k_lms, DPM++ 2M") == ("Euler a", "LMS", "DPM++ 2M")
    assert values(T["Hires sampler"], "dpm++ 2m karras") == ("DPM++ 2M Karras",)  # A1111's legacy combined name
    with pytest.raises(UserError) as err:
        values(T["Sampler"], "Euler, Eulerish")
    assert "X axis (Sampler)" in err.value.message and "'Eulerish'" in err.value.message
    plan = parse_xyz_args(args(T["Sampler"], "", x_values_dropdown=["DDIM", "Heun"]), req())
    assert plan.x.values == ("DDIM", "Heun") and plan.x.text == "DDIM,Heun"
    assert values(T["Schedule type"], "karras, SGM Uniform") == ("Karras", "SGM Uniform")
    plan = parse_xyz_args(args(T["Checkpoint name"], "anime, base.ckpt"), req(), cat)
    assert plan.x.values == cat.checkpoints and plan.x.labels == ("anime.safetensors", "base.ckpt")
    with pytest.raises(UserError, match="'nope'"):
        parse_xyz_args(args(T["Checkpoint name"], "nope"), req(), cat)
    assert parse_xyz_args(args(T["VAE"], "auto, none, KL-F8.safetensors"), req(), cat).x.values == \
        ("Automatic", "None", "kl-f8.safetensors")
    with pytest.raises(UserError, match="X axis \\(VAE\\)"):
        parse_xyz_args(args(T["VAE"], "missing.pt"), req(), cat)
    assert parse_xyz_args(args(T["Hires upscaler"], "latent, r-esrgan 4x+"), req(), cat).x.values == \
        ("Latent", "R-ESRGAN 4x+")
    with pytest.raises(UserError, match="Clip skip"):
        values(T["Clip skip"], "1, 40")


def test_img2img_indices_and_plan_pickles():
    r = Img2ImgRequest(prompt="p", steps=5, script_name="x/y/z plot", script_args=[4, "1-3"])
    plan = parse_xyz_args(args(I["Denoising"], "0.25-0.75 [3]", I["Sampler"], "Euler"), r, is_img2img=True)
    assert plan.x.values == (0.25, 0.5, 0.75) and plan.y.type.label == "Sampler"
    assert pickle.loads(pickle.dumps(plan)) == plan
    with pytest.raises(UserError, match="denoising_strength"):
        parse_xyz_args(args(I["Denoising"], "0.5, 1.5"), r, is_img2img=True)


# --- legends -------------------------------------------------------------------------------------------------------

def test_annotations_add_bands_with_text():
    cells = [Image.new("RGB", (CELL, CELL), (0, 0, 200)) for _ in range(4)]
    grid = layout_grid(cells, rows=2)
    assert grid.size == (2 * CELL, 2 * CELL)
    out = draw_grid_annotations(grid, CELL, CELL, [[GridAnnotation("Steps: 1")], [GridAnnotation("Steps: 2")]],
                                [[GridAnnotation("CFG 3")], [GridAnnotation("CFG 5")]], margin=4)
    pad_left = CELL * 3 // 4
    assert out.width == 2 * CELL + pad_left + 4 and out.height > 2 * CELL + 4
    pad_top = out.height - 2 * CELL - 4
    top_band = np.asarray(out.crop((pad_left, 0, out.width, pad_top)))
    left_band = np.asarray(out.crop((0, pad_top, pad_left, out.height)))
    assert (top_band < 100).any() and (left_band < 100).any()  # dark text on the white bands


# --- the runner with a fake generation -----------------------------------------------------------------------------

class FakeGenerate:
    """One solid-colour image per call: red = steps * 20, green = cfg * 10, blue = seed % 256."""

    def __init__(self):
        self.requests: list = []

    def __call__(self, r) -> GenerationResult:
        self.requests.append(r)
        colour = (r.steps * 20 % 256, int(r.cfg_scale * 10) % 256, r.seed % 256)
        text = f"{r.prompt}\nSteps: {r.steps}, CFG scale: {r.cfg_scale:g}, Seed: {r.seed}"
        img = Image.new("RGB", (CELL, CELL), colour)
        out = GeneratedImage(png=encode_png(img, text), infotext=text, seed=r.seed, subseed=r.subseed,
                             prompt=r.prompt, negative_prompt=r.negative_prompt)
        return GenerationResult(images=[out], info={"prompt": r.prompt, "infotexts": [text]})


def job(tmp_path, r=None, **options) -> ScriptJob:
    opts = {"grid_save": False, "return_grid": True, "samples_format": "png", "save_to_dirs": False,
            "outdir_txt2img_grids": "outputs/txt2img-grids", "enable_pnginfo": True}
    opts.update(options)
    return ScriptJob(request=r or req(), options=opts, outputs_root=tmp_path)


def pil(image: GeneratedImage) -> Image.Image:
    return Image.open(io.BytesIO(image.png)).convert("RGB")


def run_plan(tmp_path, plan_args, r=None, **options):
    r = r or req()
    gen = FakeGenerate()
    result = xyz_plot.run(parse_xyz_args(plan_args, r), job(tmp_path, r, **options), gen)
    return result, gen


def test_cells_are_placed_by_x_and_y_with_legends(tmp_path):
    result, gen = run_plan(tmp_path, args(T["Steps"], "1-3", T["CFG Scale"], "2, 4"))
    assert len(gen.requests) == 6 and len(result.images) == 1 and result.images[0].is_grid
    grid = pil(result.images[0])
    bare_w, bare_h = 3 * CELL, 2 * CELL
    assert grid.width > bare_w and grid.height > bare_h  # legend bands
    pad_left, pad_top = grid.width - bare_w, grid.height - bare_h
    for i, steps in enumerate((1, 2, 3)):
        for j, cfg in enumerate((2, 4)):
            x, y = pad_left + i * CELL + CELL // 2, pad_top + j * CELL + CELL // 2
            assert grid.getpixel((x, y)) == (steps * 20, cfg * 10, 5)
    assert (np.asarray(grid.crop((pad_left, 0, grid.width, pad_top))) < 128).any()
    assert (np.asarray(grid.crop((0, pad_top, pad_left, grid.height))) < 128).any()
    params = parse_infotext(result.info["infotexts"][0])
    assert params["Script"] == "X/Y/Z plot" and params["X Type"] == "Steps" and params["X Values"] == "1-3"
    assert params["Y Type"] == "CFG Scale" and str(params["Steps"]) == "1"


def test_no_legend_and_margins(tmp_path):
    result, _ = run_plan(tmp_path, args(T["Steps"], "1-3", T["CFG Scale"], "2, 4", draw_legend=False))
    assert pil(result.images[0]).size == (3 * CELL, 2 * CELL)
    with_margin, _ = run_plan(tmp_path, args(T["Steps"], "1-3", T["CFG Scale"], "2, 4", margin_size=10))
    plain, _ = run_plan(tmp_path, args(T["Steps"], "1-3", T["CFG Scale"], "2, 4"))
    assert pil(with_margin.images[0]).width == pil(plain.images[0]).width + 20


def test_lone_images_and_sub_grids(tmp_path):
    a = args(T["Steps"], "1, 2", T["CFG Scale"], "2, 4", T["Sigma Churn"], "0, 1, 2",
             include_lone_images=True, include_sub_grids=True)
    result, gen = run_plan(tmp_path, a)
    assert len(gen.requests) == 12
    assert len(result.images) == 1 + 3 + 12 and len(result.info["infotexts"]) == 16
    assert [im.is_grid for im in result.images] == [True] * 4 + [False] * 12
    sub = pil(result.images[1])
    main = pil(result.images[0])
    assert main.width > 3 * sub.width - 1 and main.height > sub.height  # the Z titles above
    # lone images in A1111's index order: x fastest, then y, then z
    firsts = [pil(im).getpixel((0, 0)) for im in result.images[4:8]]
    assert firsts == [(20, 20, 5), (40, 20, 5), (20, 40, 5), (40, 40, 5)]
    assert "Z Type: Sigma Churn" in result.info["infotexts"][0] and "Z Type" not in result.info["infotexts"][1]
    result, _ = run_plan(tmp_path, args(T["Steps"], "1, 2", z_type=T["CFG Scale"], z_values="2, 4"))
    assert len(result.images) == 1


def test_seeds_fixed_kept_and_varied(tmp_path):
    _, gen = run_plan(tmp_path, args(T["Steps"], "1-3"), r=req(seed=-1))
    seeds = {r.seed for r in gen.requests}
    assert len(seeds) == 1 and -1 not in seeds  # one random seed shared by every cell
    _, gen = run_plan(tmp_path, args(T["Steps"], "1-3", no_fixed_seeds=True), r=req(seed=-1))
    assert [r.seed for r in gen.requests] == [-1, -1, -1]
    _, gen = run_plan(tmp_path, args(T["Steps"], "1-3", T["CFG Scale"], "2, 4", vary_seeds_x=True, vary_seeds_y=True))
    assert sorted(r.seed for r in gen.requests) == [5, 6, 7, 8, 9, 10]
    result, gen = run_plan(tmp_path, args(T["Seed"], "-1, 3, -1"))
    seeds = [r.seed for r in gen.requests]
    assert seeds[1] == 3 and -1 not in seeds
    assert parse_infotext(result.info["infotexts"][0])["Fixed X Values"] == ", ".join(map(str, seeds))


def test_costly_axis_runs_outermost(tmp_path):
    cat = XYZCatalogs(checkpoints=("a.safetensors", "b.safetensors"))
    r = req()
    plan = parse_xyz_args(args(T["Checkpoint name"], "a, b", T["Steps"], "1-3"), r, cat)
    gen = FakeGenerate()
    result = xyz_plot.run(plan, job(tmp_path, r), gen)
    models = [q.override_settings["sd_model_checkpoint"] for q in gen.requests]
    assert models == ["a.safetensors"] * 3 + ["b.safetensors"] * 3  # one switch, not five
    grid = pil(result.images[0])
    pad_left, pad_top = grid.width - 2 * CELL, grid.height - 3 * CELL
    assert grid.getpixel((pad_left + CELL + 4, pad_top + 2 * CELL + 4))[0] == 60  # b, steps 3: column 1, row 2


def test_cells_are_ordinary_generations_and_interrupt_keeps_what_was_made(tmp_path):
    r = req(script_name="X/Y/Z plot", script_args=args(T["Steps"], "1-4"))
    gen = FakeGenerate()

    plan = parse_xyz_args(r.script_args, r)
    j = job(tmp_path, r)
    j.interrupted = lambda: len(gen.requests) >= 2
    result = xyz_plot.run(plan, j, gen)
    assert [q.script_name for q in gen.requests] == [None, None] and gen.requests[0].script_args == []
    assert result.interrupted and len(gen.requests) == 2
    grid = pil(result.images[0])
    pad_top = grid.height - CELL
    assert grid.getpixel((CELL + 4, pad_top + 4))[0] == 40 and grid.getpixel((3 * CELL + 4, pad_top + 4)) == (0, 0, 0)


def test_grid_saved_with_first_image_infotext(tmp_path):
    result, _ = run_plan(tmp_path, args(T["Steps"], "1, 2"), grid_save=True)
    saved = list((tmp_path / "outputs" / "txt2img-grids").glob("*.png"))
    assert len(saved) == 1 and "xyz_grid" in saved[0].name and result.images[0].saved_path == str(saved[0])
    text = Image.open(saved[0]).info["parameters"]
    assert text.startswith("a red house, big tree\nSteps: 1,") and "X Type: Steps" in text
    _, _ = run_plan(tmp_path / "nosave", args(T["Steps"], "1, 2"), r=req(do_not_save_grid=True), grid_save=True)
    assert not (tmp_path / "nosave" / "outputs").exists()


def test_prompt_sr_and_size_reach_the_requests(tmp_path):
    _, gen = run_plan(tmp_path, args(T["Prompt S/R"], "red, blue", T["Size"], "64x64, 96x64"))
    assert [(q.prompt, q.width) for q in gen.requests] == [
        ("a red house, big tree", 64), ("a blue house, big tree", 64),
        ("a red house, big tree", 96), ("a blue house, big tree", 96)]


# --- through the real txt2img pipeline on the tiny model -----------------------------------------------------------

def test_steps_axis_through_the_tiny_model(tiny_models, tmp_path):
    import torch

    from backend.checkpoints import ModelFile
    from backend.core.options import SETTINGS
    from backend.engine.devices import DevicePolicy
    from backend.engine.loaded_model import LoadedModel
    from backend.engine.model_loader import load_sd_model
    from backend.engine.pipelines import txt2img
    from backend.core.sampler_catalog import resolve_sampling
    from backend.engine.pipelines.common import JobContext, StepClock

    torch.set_num_threads(1)
    policy = DevicePolicy(device=torch.device("cpu"), dtype=torch.float32, vae_dtype=torch.float32)
    loaded = LoadedModel(load_sd_model(tiny_models["sd1"]))
    policy.place(loaded)
    ckpt = tiny_models["sd1"]
    options = {s.key: s.default for s in SETTINGS}

    def generate(r):
        ctx = JobContext(loaded=loaded, policy=policy, options=options, outputs_root=tmp_path,
                         checkpoint=ModelFile(ckpt.name, ckpt, sha256="0" * 64), vae=None, control=StepClock(),
                         sampling=resolve_sampling(r, options["default_sampler"]))
        return txt2img.run(r, ctx)

    base = Txt2ImgRequest(prompt="a red house", steps=4, width=64, height=64, seed=-1, sampler_name="Euler",
                          do_not_save_samples=True)
    plan = parse_xyz_args(args(T["Steps"], "1-3", include_lone_images=True), base)
    result = xyz_plot.run(plan, ScriptJob(request=base, options=options, outputs_root=tmp_path), generate)
    assert len(result.images) == 4 and result.images[0].is_grid
    cells = [np.asarray(pil(im)).astype(int) for im in result.images[1:]]
    assert all(c.shape == (64, 64, 3) for c in cells)
    # the tiny random model changes little per step, but each step count gives other pixels
    assert not np.array_equal(cells[0], cells[1]) and not np.array_equal(cells[1], cells[2])
    assert not np.array_equal(cells[0], cells[2])
    texts = [parse_infotext(t) for t in result.info["infotexts"][1:]]
    assert [str(t["Steps"]) for t in texts] == ["1", "2", "3"] and len({t["Seed"] for t in texts}) == 1
    grid = pil(result.images[0])
    assert grid.width == 3 * 64 and grid.height > 64  # column labels above; no row labels without a Y axis
    saved = list((tmp_path / "outputs" / "txt2img-grids").rglob("*xyz_grid*.png"))
    assert len(saved) == 1 and "Script: X/Y/Z plot" in Image.open(saved[0]).info["parameters"]


def test_model_axes_name_the_checkpoints_and_vaes_their_cells_use():
    from backend.core.scripts_catalog import xyz_model_choices

    cat = XYZCatalogs(checkpoints=("a.safetensors [00aa]", "b.safetensors [00bb]"), vaes=("v.pt",))
    plan = parse_xyz_args(args(T["Steps"], "1, 2", T["Checkpoint name"], "a, b", T["VAE"], "None, v.pt"), req(), cat)
    assert xyz_model_choices(plan) == [  # each combination once, in the order the cells run (checkpoint outermost)
        {"sd_model_checkpoint": "a.safetensors [00aa]", "sd_vae": "None"},
        {"sd_model_checkpoint": "a.safetensors [00aa]", "sd_vae": "v.pt"},
        {"sd_model_checkpoint": "b.safetensors [00bb]", "sd_vae": "None"},
        {"sd_model_checkpoint": "b.safetensors [00bb]", "sd_vae": "v.pt"}]
    assert xyz_model_choices(parse_xyz_args(args(T["Steps"], "1, 2"), req())) == []


# --- axes an extension adds (ControlNet's, through easel_extension.py) ----------------------------------------------

class _FakeControlNet:
    """What ControlNet's axes read of its component: the model titles and the preprocessor names."""

    class registry:
        @staticmethod
        def titles():
            return ["control_v11p_sd15_canny [d14c016b]"]

    @staticmethod
    def module_names():
        return ["none", "canny"]


def _cn_axes():
    from backend.controlnet.xyz_axes import controlnet_axes
    return controlnet_axes(_FakeControlNet())


def test_extension_axes_follow_a1111s_and_change_the_units():
    from backend.core.scripts_catalog import xyz_plot_specs

    extra = _cn_axes()
    assert [a.label for a in extra] == [f"[ControlNet] {n}" for n in (
        "Enabled", "Model", "Weight", "Guidance Start", "Guidance End", "Control Mode", "Resize Mode", "Preprocessor",
        "Pre Resolution", "Pre Threshold A", "Pre Threshold B")]  # sd-webui-controlnet's order
    for img2img in (False, True):
        axes, a1111 = xyz_axes(img2img, extra), xyz_axes(img2img)[:-1]  # less Forge's Distilled CFG Scale
        assert axes[:len(a1111)] == a1111 and axes[len(a1111):-1] == list(extra)  # A1111's indices unchanged
        assert xyz_arg_specs(img2img, extra)[0].choices == tuple(a.label for a in axes)
    n = T["Size"] + 1  # the first extension axis: right after A1111's list
    units = [{"enabled": True, "weight": 1.0, "model": "x"}, {"enabled": False, "weight": 1.0}]
    base = req(alwayson_scripts={"controlnet": {"args": units}})
    plan = parse_xyz_args(args(n + 2, "0-1 (+0.5)", n + 5, "controlnet is more important, Balanced",
                               n, "False"), base, extra_axes=extra)
    assert plan.x.values == (0.0, 0.5, 1.0) and plan.x.labels[1] == "[ControlNet] Weight: 0.5"
    assert plan.y.values == ("ControlNet is more important", "Balanced")  # the dropdown's spelling
    from backend.core.xyz_axes import cell_request
    cell = cell_request(base, [(plan.x.type, 0.5, plan.x.values), (plan.y.type, "Balanced", plan.y.values),
                               (plan.z.type, "False", plan.z.values)])
    got = cell.alwayson_scripts["controlnet"]["args"]
    assert [u["weight"] for u in got] == [0.5, 0.5]  # a value goes to every unit, as sd-webui-controlnet's
    assert [u["control_mode"] for u in got] == ["Balanced", "Balanced"]
    assert [u["enabled"] for u in got] == ["False", False]  # Enabled: the first unit only
    assert base.alwayson_scripts["controlnet"]["args"] == units  # the base request is unchanged
    assert plan.always_on_key((1, 0, 0)) == (1, 0, 0)
    assert parse_xyz_args(args(T["Steps"], "1, 2"), base, extra_axes=extra).always_on_key((1, 0, 0)) is None

    # the catalog's prepare: one always-on variant per combination of the extension axes' values, named for errors;
    # the plan the engine receives holds no app-side function (it pickles)
    spec = xyz_plot_specs(lambda: XYZCatalogs(), lambda: 100, extra)[0]
    values = spec.values(spec.check_args(args(n + 2, "0, 1", T["Steps"], "1, 2")))
    prepared = spec.prepare(base, values)
    assert sorted(prepared.always_on) == [(0, -1, -1), (1, -1, -1)]
    label, alwayson = prepared.always_on[(1, -1, -1)]
    assert "X axis ([ControlNet] Weight) value 1.0" in label and alwayson["controlnet"]["args"][0]["weight"] == 1.0
    plan = pickle.loads(pickle.dumps(prepared.args))
    assert plan.x.type.label == "[ControlNet] Weight" and plan.x.type.apply is None
    assert plan.always_on_key((0, 1, 0)) == (0, -1, -1)


def test_extension_axis_cells_get_their_variant_of_the_scripts(tmp_path):
    extra = _cn_axes()
    n = T["Size"] + 1  # the first extension axis: right after A1111's list
    plan = parse_xyz_args(args(n + 2, "0, 1", T["Steps"], "1, 2"), req(), extra_axes=extra)
    gen = FakeGenerate()
    calls = []

    def generate(r, **kw):
        calls.append(kw.get("scripts"))
        return gen(r)

    j = job(tmp_path)
    j.always_on_variants = {(0, -1, -1): {"controlnet": "w0"}, (1, -1, -1): {"controlnet": "w1"}}
    result = xyz_plot.run(plan, j, generate)
    assert len(result.images) == 1
    assert calls == [{"controlnet": "w0"}, {"controlnet": "w1"}] * 2  # X fastest, each cell its own
    assert parse_infotext(result.info["infotexts"][0])["X Type"] == "[ControlNet] Weight"


def test_rng_source_axis_sets_the_setting_per_cell():
    from backend.core.xyz_axes import cell_request
    plan = parse_xyz_args(args(T["RNG source"], "cpu, NV, gpu"), req())
    assert plan.x.values == ("CPU", "NV", "GPU") and plan.x.type.setting == "randn_source"
    assert XYZCatalogs().axis_choices(plan.x.type) == ["GPU", "CPU", "NV"]
    cell = cell_request(req(), [(plan.x.type, "NV", plan.x.values)])
    assert cell.override_settings["randn_source"] == "NV"
    with pytest.raises(UserError, match="X axis \\(RNG source\\).*'TPU'"):
        parse_xyz_args(args(T["RNG source"], "TPU"), req())


def test_ngms_token_merging_and_distilled_cfg_axes_set_their_field_or_setting_per_cell():
    from backend.core.xyz_axes import cell_request
    ngms = parse_xyz_args(args(T["Negative Guidance minimum sigma"], "0, 1.5"), req()).x
    assert cell_request(req(), [(ngms.type, 1.5, ngms.values)]).s_min_uncond == 1.5
    tome = parse_xyz_args(args(T["Token merging ratio"], "0-0.5 [2]"), req()).x
    assert tome.values == (0.0, 0.5)
    assert cell_request(req(), [(tome.type, 0.5, tome.values)]).override_settings == {"token_merging_ratio": 0.5}
    tome_hr = parse_xyz_args(args(T["Token merging ratio high-res"], "0.3"), req()).x
    assert cell_request(req(), [(tome_hr.type, 0.3, tome_hr.values)]).override_settings == {"token_merging_ratio_hr": 0.3}
    guidance = parse_xyz_args(args(T["Distilled CFG Scale"], "2.5, 3.5"), req()).x
    assert cell_request(req(), [(guidance.type, 2.5, guidance.values)]).distilled_cfg_scale == 2.5
    i2i = Img2ImgRequest(prompt="x", init_images=["x"], width=64, height=64)
    guidance = parse_xyz_args(args(I["Distilled CFG Scale"], "5"), i2i, is_img2img=True).x
    assert cell_request(i2i, [(guidance.type, 5.0, guidance.values)]).distilled_cfg_scale == 5.0
    # each value passes the request's and the settings' checks before the first image
    with pytest.raises(UserError, match="X axis \\(Token merging ratio\\).*is refused"):
        parse_xyz_args(args(T["Token merging ratio"], "0.5, 2"), req())
    with pytest.raises(UserError, match="X axis \\(Distilled CFG Scale\\).*is refused"):
        parse_xyz_args(args(T["Distilled CFG Scale"], "3, 200"), req())
