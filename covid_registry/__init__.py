"""The registry: blessing and the champion, exports (Core ML, TFLite), model cards and run folders.

It is the pipeline's Pusher: it decides what ships and writes what users download. It reads
models through ``covid_models`` and figures through ``covid_eval``; nothing below imports it.
"""
