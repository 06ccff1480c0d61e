"""Batched image classification: a core library, and the servers' adapters over it.

The core (no server imported anywhere in it):
    classifier    -- ImageClassifier: load / classify / classify_requests / close (the public face)
    model_files   -- read_model: a model directory or .mar -> ModelSpec (config, labels, weights)
    process       -- configure_process: allocator, Pillow's pixel limit, torch threads (whoever
                     owns the process calls it)
    config        -- HandlerConfig, validated once from model-config.yaml's ``handler:`` section
    errors        -- ImageError / RequestError, and failure codes -> HTTP statuses
    inputs        -- what counts as an image (bytes, paths, PIL images, tensors)
    pipeline      -- decode -> batch -> model -> top-k, with the loader workers and the model
    images        -- image bytes -> uint8 CHW tensor (decode, EXIF, RGB, resize/crop)
    dataset       -- the torch Dataset the DataLoader workers run ``images`` in
    loader        -- the persistent multi-worker DataLoader, reset per batch of requests
    supervisor    -- the torch-private DataLoader internals: worker liveness, restart, stop
    transport     -- the shared-memory inbox (bytes out) and staging ring (pixels back) together
    inbox         -- shared-memory arena the image bytes travel to the workers in
    staging       -- shared-memory slots the workers write batches into (pinned on CUDA)
    gpu_decode    -- optional batched nvJPEG decode and resize on the GPU
    jpeg_header   -- JPEG header marker walk (size, components, EXIF orientation)
    assemble      -- decoded chunks gathered into full model batches on the device
    normalize     -- uint8 batch -> normalized float model input on the device
    devices       -- device choice, autocast dtype, thread budget
    architectures -- the demo model (ShapesNet) and the architecture registry
    model_loading -- build an architecture and load its weights and labels
    optimize      -- inference-only rewrites: BatchNorm folding, optional torch.compile
    memory        -- allocator settings: freed memory kept for the next batch (glibc)
    postprocess   -- logits -> top-k {label: score}
    metrics       -- per-stage timings (CUDA events on a GPU)
    protocols     -- wire formats, one module each, parse and encode together: raw, multipart,
                     json_images, kserve_v1, kserve_v2

Adapters:
    service         -- the one TorchServe handler class: context <-> core
    torchserve_io   -- TorchServe's request rows, statuses, response headers and metrics
"""
