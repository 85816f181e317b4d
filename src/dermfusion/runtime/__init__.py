"""How a process uses the hardware: ``device`` (device, precision, threads, seeding, CPU features) and
``distributed`` (the torchrun session: ranks, process group, collective error handling).

Training, inference, evaluation, benchmarks and the service all run on these; nothing here knows about
models or bundles.
"""
