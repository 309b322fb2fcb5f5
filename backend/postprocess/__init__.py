"""Post-processing of finished images: upscaling and face restoration, shared by txt2img, img2img and Extras.

- `model_files`: reading upscaler / face-restorer files safely and loading them with spandrel; the model cache.
- `upscalers`: the upscaler registry (None, Lanczos, Nearest, model files) and tiled model inference.
- `face_detection`: RetinaFace (facexlib) or the offline OpenCV Haar fallback; alignment to the FFHQ template.
- `face_restore`: GFPGAN / CodeFormer on each detected face, pasted back with a soft mask.
- `extras`: the Extras job (resize, upscalers, face restoration in A1111's order, saving with parameters).
- `service`: the app process's side (lists for the UI/API, extras jobs).
"""
