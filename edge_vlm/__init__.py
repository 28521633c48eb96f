"""edge-vlm: run MiniGPT-4-family vision-language models on the hardware people own.

Nothing heavy is imported here: `Pipeline` is resolved on first use so that
`import edge_vlm` and `edge-vlm --help` stay instant.
"""
__version__ = "0.1.0"

__all__ = ["Pipeline", "__version__"]


def __getattr__(name):
    if name == "Pipeline":
        from edge_vlm.runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
