"""/openapi.json names its schemas as AUTOMATIC1111's (`modules/api/models.py`) and the routes' request bodies and
answers reference them, so SDKs generated from A1111's schema work; the real answers fit those schemas."""
from __future__ import annotations

import httpx
import pytest

A1111_SCHEMAS = {
    "StableDiffusionProcessingTxt2Img", "StableDiffusionProcessingImg2Img", "TextToImageResponse",
    "ImageToImageResponse", "ExtrasSingleImageRequest", "ExtrasSingleImageResponse", "ExtrasBatchImagesRequest",
    "ExtrasBatchImagesResponse", "FileData", "PNGInfoRequest", "PNGInfoResponse", "ProgressResponse", "Options",
    "Flags", "SamplerItem", "SchedulerItem", "UpscalerItem", "LatentUpscalerModeItem", "SDModelItem", "SDVaeItem",
    "FaceRestorerItem", "RealesrganItem", "PromptStyleItem", "EmbeddingItem", "EmbeddingsResponse", "MemoryResponse",
    "ScriptsList", "ScriptArg", "ScriptInfo", "ExtensionItem",
}
# route -> (request body schema or None, 200 answer schema; "[X]" = a list of X)
ROUTES = {
    ("post", "/sdapi/v1/txt2img"): ("StableDiffusionProcessingTxt2Img", "TextToImageResponse"),
    ("post", "/sdapi/v1/img2img"): ("StableDiffusionProcessingImg2Img", "ImageToImageResponse"),
    ("post", "/sdapi/v1/extra-single-image"): ("ExtrasSingleImageRequest", "ExtrasSingleImageResponse"),
    ("post", "/sdapi/v1/extra-batch-images"): ("ExtrasBatchImagesRequest", "ExtrasBatchImagesResponse"),
    ("post", "/sdapi/v1/png-info"): ("PNGInfoRequest", "PNGInfoResponse"),
    ("get", "/sdapi/v1/progress"): (None, "ProgressResponse"),
    ("get", "/sdapi/v1/options"): (None, "Options"),
    ("get", "/sdapi/v1/cmd-flags"): (None, "Flags"),
    ("get", "/sdapi/v1/samplers"): (None, "[SamplerItem]"),
    ("get", "/sdapi/v1/schedulers"): (None, "[SchedulerItem]"),
    ("get", "/sdapi/v1/upscalers"): (None, "[UpscalerItem]"),
    ("get", "/sdapi/v1/latent-upscale-modes"): (None, "[LatentUpscalerModeItem]"),
    ("get", "/sdapi/v1/sd-models"): (None, "[SDModelItem]"),
    ("get", "/sdapi/v1/sd-vae"): (None, "[SDVaeItem]"),
    ("get", "/sdapi/v1/face-restorers"): (None, "[FaceRestorerItem]"),
    ("get", "/sdapi/v1/realesrgan-models"): (None, "[RealesrganItem]"),
    ("get", "/sdapi/v1/prompt-styles"): (None, "[PromptStyleItem]"),
    ("get", "/sdapi/v1/embeddings"): (None, "EmbeddingsResponse"),
    ("get", "/sdapi/v1/memory"): (None, "MemoryResponse"),
    ("get", "/sdapi/v1/scripts"): (None, "ScriptsList"),
    ("get", "/sdapi/v1/script-info"): (None, "[ScriptInfo]"),
    ("get", "/sdapi/v1/extensions"): (None, "[ExtensionItem]"),
    ("get", "/sdapi/v1/workers"): (None, "[WorkerItem]"),  # Easel's own
}
JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict,
              "null": type(None)}


@pytest.fixture(scope="module")
def spec(server) -> dict:
    r = httpx.get(server.url + "/openapi.json", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def ref_name(schema: dict) -> str:
    if schema.get("type") == "array":
        return f"[{ref_name(schema['items'])}]"
    return schema["$ref"].rsplit("/", 1)[-1]


def check(value, schema: dict, spec: dict, where: str) -> None:
    """`value` fits `schema` (a small JSON-schema check: refs, anyOf, types, required properties, items)."""
    if "$ref" in schema:
        return check(value, spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]], spec, where)
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                return check(value, option, spec, where)
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError(f"{where}: fits none of {errors}")
    kind = schema.get("type")
    if kind:
        assert isinstance(value, JSON_TYPES[kind]) and not (kind in ("integer", "number") and isinstance(value, bool)), \
            f"{where}: {value!r} is not {kind}"
    if kind == "object":
        for name in schema.get("required", []):
            assert name in value, f"{where}: {name} missing"
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                check(value[name], sub, spec, f"{where}.{name}")
        if isinstance(schema.get("additionalProperties"), dict):
            for name, item in value.items():
                check(item, schema["additionalProperties"], spec, f"{where}.{name}")
    if kind == "array" and "items" in schema:
        for i, item in enumerate(value):
            check(item, schema["items"], spec, f"{where}[{i}]")


def test_schema_names_are_a1111s(spec):
    names = set(spec["components"]["schemas"])
    assert A1111_SCHEMAS <= names, sorted(A1111_SCHEMAS - names)
    assert not {"Txt2ImgRequest", "Img2ImgRequest", "PngInfoRequest"} & names
    txt2img = spec["components"]["schemas"]["StableDiffusionProcessingTxt2Img"]["properties"]
    assert {"prompt", "steps", "sampler_name", "script_name", "alwayson_scripts", "force_task_id"} <= set(txt2img)
    img2img = spec["components"]["schemas"]["StableDiffusionProcessingImg2Img"]["properties"]
    assert {"init_images", "mask", "denoising_strength", "include_init_images"} <= set(img2img)
    assert {"images", "parameters", "info"} <= set(spec["components"]["schemas"]["TextToImageResponse"]["properties"])
    options = spec["components"]["schemas"]["Options"]["properties"]
    assert {"sd_model_checkpoint", "samples_format", "CLIP_stop_at_last_layers"} <= set(options)
    assert {"api", "nowebui", "data_dir", "api_server_stop"} <= set(spec["components"]["schemas"]["Flags"]["properties"])


@pytest.mark.parametrize("method, path", list(ROUTES))
def test_routes_reference_the_schemas(spec, method, path):
    body, answer = ROUTES[(method, path)]
    op = spec["paths"][path][method]
    if body:
        assert ref_name(op["requestBody"]["content"]["application/json"]["schema"]) == body
    assert ref_name(op["responses"]["200"]["content"]["application/json"]["schema"]) == answer


def test_answers_fit_their_schemas(spec, server):
    with httpx.Client(base_url=server.url, timeout=600) as client:
        for (method, path), (_body, answer) in ROUTES.items():
            if method != "get":
                continue
            r = client.get(path)
            assert r.status_code == 200, (path, r.text)
            check(r.json(), spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"],
                  spec, path)
        r = client.post("/sdapi/v1/txt2img", json={
            "prompt": "a cat", "steps": 1, "width": 64, "height": 64, "sampler_name": "Euler",
            "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors"}})
        assert r.status_code == 200, r.text
        check(r.json(), {"$ref": "#/components/schemas/TextToImageResponse"}, spec, "txt2img")
        assert len(r.json()["images"]) == 1 and r.json()["parameters"]["prompt"] == "a cat"
        r = client.post("/sdapi/v1/png-info", json={"image": r.json()["images"][0]})
        assert r.status_code == 200, r.text
        check(r.json(), {"$ref": "#/components/schemas/PNGInfoResponse"}, spec, "png-info")
        assert r.json()["parameters"]["Steps"] == 1 or r.json()["parameters"]["Steps"] == "1"
