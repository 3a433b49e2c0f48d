"""From a model file to a running service: the layer above ``conversion`` and ``service``.

``deploy.prepare`` decides what to serve (a TensorRT engine on a GPU, an ONNX model on a CPU, ...) and
makes it exist in the cache; ``deploy.cli`` holds the commands that do it (``refinedet serve``,
``refinedet prepare``, ``refinedet healthcheck``), which are also the container's command and
healthcheck. It imports both layers below it; neither imports it.
"""
