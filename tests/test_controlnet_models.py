"""ControlNet model files: original single-file layout (SD1/SD2/SDXL, .pth/.safetensors, fp16, with and without
the `control_model.` prefix) and diffusers-format files are detected from their shapes and load exactly."""
from __future__ import annotations

import pytest
import torch

from backend.controlnet.model_files import ControlNetRegistry, detect_controlnet, legacy_short_hash
from backend.core.tensor_headers import read_shapes
from backend.engine.controlnet.model_files import load_controlnet
from backend.engine.controlnet.runtime import fits
from backend.core.errors import UserError
from controlnet_factory import write_tiny_controlnet

torch.set_num_threads(1)

TIME_DIM = {"sd1": None, "sd2": None, "sdxl": 8}


@pytest.mark.parametrize("family,layout,name,dtype,prefix", [
    ("sd1", "original", "control_v11p_sd15_canny.pth", torch.float32, True),
    ("sd1", "original", "control_v11p_sd15_canny_fp16.safetensors", torch.float16, True),
    ("sd1", "original", "control_sd15_noprefix.safetensors", torch.float32, False),
    ("sd2", "original", "controlnet_sd21_canny.safetensors", torch.float32, True),
    ("sdxl", "diffusers", "diffusers_xl_canny_full.safetensors", torch.float16, True),
    ("sdxl", "original", "controlnet_xl_ldm.safetensors", torch.float32, True),
    ("sd1", "diffusers", "control_v11p_sd15_diffusers.safetensors", torch.float32, True),
])
def test_detect_and_load_exactly(tmp_path, family, layout, name, dtype, prefix):
    path = tmp_path / name
    original = write_tiny_controlnet(path, family, layout=layout, dtype=dtype, prefix=prefix)
    info = detect_controlnet(read_shapes(path), addition_time_embed_dim=TIME_DIM[family])
    assert info.family == family
    assert info.layout == ("diffusers" if layout == "diffusers" else "ldm")
    model, info = load_controlnet(path, addition_time_embed_dim=TIME_DIM[family])
    want = original.state_dict()
    got = model.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v.to(dtype).float()), k
    assert dict(model.config)["block_out_channels"] == list(original.config.block_out_channels)


def test_registry_titles_lookup_and_family_filter(tmp_path):
    folder = tmp_path / "ControlNet"
    write_tiny_controlnet(folder / "control_v11p_sd15_canny.pth", "sd1")
    write_tiny_controlnet(folder / "xl" / "diffusers_xl_canny_full.safetensors", "sdxl", layout="diffusers", seed=3)
    (folder / "Put ControlNet models here.txt").write_text("")
    reg = ControlNetRegistry([folder])
    titles = reg.titles()
    assert len(titles) == 2
    h = legacy_short_hash(folder / "control_v11p_sd15_canny.pth")
    assert f"control_v11p_sd15_canny [{h}]" in titles and len(h) == 8
    for query in (f"control_v11p_sd15_canny [{h}]", "control_v11p_sd15_canny", "control_v11p_sd15_canny.pth",
                  f"control_v11p_sd15_canny [{h}]".upper().replace("CONTROL", "control").replace(h.upper(), h)):
        assert reg.find(query).path.name == "control_v11p_sd15_canny.pth"
    assert reg.titles_for("sd1") == [f"control_v11p_sd15_canny [{h}]"]
    assert [t.split(" [")[0] for t in reg.titles_for("sdxl")] == ["diffusers_xl_canny_full"]
    assert reg.titles_for("sd2") == []
    with pytest.raises(UserError, match="not found. Available: control_v11p_sd15_canny"):
        reg.find("control_v11p_sd15_depth")


def test_files_that_are_not_controlnets_give_clear_errors(tmp_path, tiny_models):
    with pytest.raises(UserError, match="Stable Diffusion checkpoint"):
        detect_controlnet(read_shapes(tiny_models["sd1"]))
    bogus = tmp_path / "bogus.safetensors"
    from safetensors.torch import save_file
    save_file({"foo.weight": torch.zeros(2)}, str(bogus))
    with pytest.raises(UserError, match="not a ControlNet"):
        load_controlnet(bogus)


def test_fits_checks_family_and_shapes(tmp_path, tiny_models):
    from backend.engine.model_loader import load_sd_model
    sd1 = load_sd_model(tiny_models["sd1"])
    write_tiny_controlnet(tmp_path / "a.pth", "sd1")
    write_tiny_controlnet(tmp_path / "b.safetensors", "sdxl", layout="diffusers")
    _, info1 = load_controlnet(tmp_path / "a.pth")
    _, info2 = load_controlnet(tmp_path / "b.safetensors", addition_time_embed_dim=8)
    assert fits(info1, sd1) is None
    assert "SDXL ControlNet" in fits(info2, sd1) and "Stable Diffusion 1.x" in fits(info2, sd1)


def test_shuffle_models_use_global_average_pooling(tmp_path):
    write_tiny_controlnet(tmp_path / "control_v11e_sd15_shuffle.safetensors", "sd1")
    write_tiny_controlnet(tmp_path / "my_model.safetensors", "sd1")
    (tmp_path / "my_model.yaml").write_text("model:\n  params:\n    control_stage_config:\n      params:\n"
                                          "        global_average_pooling: True\n")
    write_tiny_controlnet(tmp_path / "plain.safetensors", "sd1")
    assert load_controlnet(tmp_path / "control_v11e_sd15_shuffle.safetensors")[1].global_average_pooling
    assert load_controlnet(tmp_path / "my_model.safetensors")[1].global_average_pooling
    assert not load_controlnet(tmp_path / "plain.safetensors")[1].global_average_pooling
