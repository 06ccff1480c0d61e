"""The harness the tests and the benchmarks share (not shipped in archives; installed editable
with the package by scripts/setup.sh):

    ts_server     a real TorchServe on free loopback ports, started from a temp dir
    door_server   the KServe door (python -m handler.doors.kserve_door) as a real process
    ray_cluster   a real multi-node Ray cluster on loopback
    model_dirs    torchvision models with random, image-sensitive weights as model directories
    zoo_folders   timm and transformers model folders built offline, and the zoos' own pipelines
    shapes        the demo's drawn shapes (circle, square, triangle)
    bench_images  real photos at benchmark sizes, and the stock handler's transform
    timing        latency summaries and timed request loops
    wire          request bodies as clients send them (multipart/mixed)
    commands      a command of scripts/ or benchmarks/ loaded as a module
    machine       the CPU model, its features and the versions, for result files
    archives      a copy of an archive with other handler settings
"""
