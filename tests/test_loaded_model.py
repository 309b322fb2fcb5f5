"""`LoadedModel`: the state the backend keeps about a checkpoint lives in it, not on the torch modules, and
survives what happens to the modules: a move between residencies keeps the chosen VAE and the LoRA patches
(both still undo exactly afterwards), an upcast VAE and a forced smaller plan stay, and releasing the model
releases the ControlNets placed beside it (their hooks removed, their weights off the device).

On this CPU-only machine the "device" is the CPU; --medvram/--lowvram still install the same hooks and copies.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from backend.engine.controlnet.runtime import ControlNetCache
from backend.engine.devices import DevicePolicy, Plan
from backend.engine.loaded_model import LoadedModel
from backend.engine.model_loader import load_sd_model
from backend.engine.networks.lora_apply import ActiveNetwork, NetworkPatcher
from backend.engine.worker import VaeSwitcher
from backend.engine.networks.lora_files import read_network_file
from controlnet_factory import write_tiny_controlnet
from lora_factory import save_lora, simple_lora

torch.set_num_threads(1)
CPU = torch.device("cpu")


def cpu_policy(mode="resident", **kw) -> DevicePolicy:
    kw.setdefault("vae_dtype", torch.float32)
    return DevicePolicy(device=CPU, dtype=torch.float32, mode=mode, **kw)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def no_easel_attributes(*modules: torch.nn.Module) -> bool:
    return not [k for root in modules for m in root.modules() for k in vars(m) if k.startswith("_easel")]


@pytest.fixture()
def loaded(tiny_models) -> LoadedModel:
    return LoadedModel(load_sd_model(tiny_models["sd1"]))


@pytest.fixture()
def vae_file(loaded, tmp_path):
    """A VAE file for the tiny SD 1.x model (diffusers names): the model's own VAE, every weight changed."""
    gen = torch.Generator().manual_seed(3)
    state = {k: (v + 0.05 * torch.randn(v.shape, generator=gen)).contiguous() if v.is_floating_point() else v
             for k, v in loaded.model.vae.state_dict().items()}
    path = tmp_path / "other-vae.safetensors"
    save_file(state, str(path))
    return path


def test_vae_choice_and_lora_patches_survive_a_move_between_residencies(loaded, vae_file, tmp_path):
    model = loaded.model
    own_vae, own_unet, own_text = weights(model.vae), weights(model.unet), weights(model.text_encoders[0])
    resident, medvram = cpu_policy(), cpu_policy("medvram")
    resident.place(loaded)

    switcher = VaeSwitcher()
    switcher.apply(loaded, str(vae_file))
    chosen_vae = weights(model.vae)
    assert loaded.vae.path == str(vae_file) and not same(chosen_vae, own_vae)
    assert same(loaded.vae.own_state, own_vae)  # the checkpoint's own VAE, kept to come back to

    lora = read_network_file(save_lora(tmp_path / "style.safetensors", simple_lora("sd1", seed=4), family="sd1"))
    networks = [ActiveNetwork(lora, 1.0, 1.0, label="style")]
    reports = NetworkPatcher(loaded).apply(networks)
    assert reports[0].applied > 0 and loaded.lora.active and loaded.lora.reports == reports
    patched_unet, patched_text = weights(model.unet), weights(model.text_encoders[0])
    assert not same(patched_unet, own_unet) and not same(patched_text, own_text)
    backed_up = dict(loaded.lora.backup)

    # The move: off the device, then placed again with the parts offloaded (hooks, a streamer).
    resident.release(loaded)
    assert loaded.placed is None and loaded.streamer is None
    medvram.place(loaded)
    assert loaded.streamer is not None and loaded.place_hooks and medvram.mode_for(loaded) == "medvram"

    # What the model carries survived, in the LoadedModel (nothing was stuck onto the modules).
    assert loaded.vae.path == str(vae_file) and same(weights(model.vae), chosen_vae)
    assert loaded.lora.backup.keys() == backed_up.keys()
    assert same(weights(model.unet), patched_unet) and same(weights(model.text_encoders[0]), patched_text)
    assert no_easel_attributes(model.unet, model.vae, *model.text_encoders)

    # The same LoRA set after the move: re-applied from the originals (the placement changed), same weights.
    medvram.settle(loaded)
    NetworkPatcher(loaded).apply(networks)
    assert loaded.lora.signature[0] == loaded.placed
    assert same(weights(model.unet), patched_unet) and same(weights(model.text_encoders[0]), patched_text)

    # Both still undo exactly.
    switcher.apply(loaded, str(vae_file))  # already chosen: nothing read, nothing changed
    assert same(weights(model.vae), chosen_vae)
    switcher.apply(loaded, None)
    assert loaded.vae.path is None and same(weights(model.vae), own_vae)
    assert NetworkPatcher(loaded).apply([]) == []
    assert not loaded.lora.active and loaded.lora.signature == () and loaded.lora.reports == []
    assert same(weights(model.unet), own_unet) and same(weights(model.text_encoders[0]), own_text)


def test_a_vae_upcast_and_a_forced_plan_stay_with_the_model(loaded):
    policy = cpu_policy("auto", vae_dtype=torch.bfloat16, free_memory=lambda: 1 << 40)
    policy.place(loaded)
    assert loaded.plan == Plan() and next(loaded.model.vae.parameters()).dtype == torch.bfloat16
    policy.upcast_vae(loaded)
    assert loaded.vae_upcast and next(loaded.model.vae.parameters()).dtype == torch.float32
    assert policy.degrade(loaded)  # as after an out-of-memory error
    forced = loaded.forced_plan
    assert forced is not None and forced != Plan() and loaded.plan == forced
    policy.release(loaded)
    policy.place(loaded)  # plenty of memory free, but the forced plan and the float32 VAE stay
    assert loaded.plan == forced and policy.plan_for(loaded) == forced
    assert next(loaded.model.vae.parameters()).dtype == torch.float32


@pytest.mark.parametrize("mode", ["resident", "lowvram"])
def test_releasing_a_model_releases_its_controlnets(loaded, tmp_path, mode):
    policy = cpu_policy(mode, lowvram_budget=0)
    policy.place(loaded)
    path = tmp_path / "control_v11p_sd15_canny.safetensors"
    write_tiny_controlnet(path, "sd1", seed=11)
    cache = ControlNetCache(policy)
    controlnet, _info = cache.get(path, loaded.model, limit=2)
    cache.place_beside(controlnet, loaded)
    companion = loaded.companion(controlnet)
    assert companion is not None and companion.module is controlnet and cache.owner() is loaded
    hooked = sum(len(m._forward_pre_hooks) for m in controlnet.modules())
    assert hooked == len(companion.hooks) and (hooked > 0) == (mode == "lowvram")
    policy.place_beside(controlnet, loaded)  # placed already: nothing is added
    assert sum(len(m._forward_pre_hooks) for m in controlnet.modules()) == hooked

    policy.release(loaded)
    assert loaded.companions == {} and loaded.placed is None
    assert sum(len(m._forward_pre_hooks) for m in controlnet.modules()) == 0
    assert {p.device for p in controlnet.parameters()} == {policy.offload_device}
    assert no_easel_attributes(controlnet)


def test_controlnets_move_to_the_checkpoint_they_now_run_beside(loaded, tiny_models, tmp_path):
    """A ControlNet is one checkpoint's companion at a time: placing it beside another releases it from the first
    (the first's streamer hooks would otherwise still fire)."""
    policy = cpu_policy("lowvram", lowvram_budget=0)
    other = LoadedModel(load_sd_model(tiny_models["sd1"]))
    policy.place(loaded)
    path = tmp_path / "control_v11p_sd15_canny.safetensors"
    write_tiny_controlnet(path, "sd1", seed=11)
    cache = ControlNetCache(policy)
    controlnet, _info = cache.get(path, loaded.model, limit=2)
    cache.place_beside(controlnet, loaded)
    first_hooks = loaded.companion(controlnet).hooks
    policy.place(other)
    cache.place_beside(controlnet, other)
    assert loaded.companions == {} and cache.owner() is other
    assert other.companion(controlnet) is not None and other.companion(controlnet).hooks is not first_hooks
    assert sum(len(m._forward_pre_hooks) for m in controlnet.modules()) == len(other.companion(controlnet).hooks)
    cache.clear()
    assert other.companions == {} and sum(len(m._forward_pre_hooks) for m in controlnet.modules()) == 0
