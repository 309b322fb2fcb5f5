"""Interrogation in the backend process: a caption for a picture, as A1111's Interrogate buttons and
`POST /sdapi/v1/interrogate`.

- `deepbooru_model`: the DeepDanbooru network, shaped from its file;
- `deepbooru`: finding, loading and running it, and its tags as A1111 writes them;
- `runtime`: the model files (downloaded on first use), the loaded networks and their device;
- `job`: the "interrogate" job kind.
"""
