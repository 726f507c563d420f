"""What both HF fixtures need of transformers 5's processors: the image processor of a backend, and the family's
processor built without a video processor (that one needs torchvision, which the project does not install;
nothing here passes videos, and the image and text paths are transformers' own code, unchanged)."""

from __future__ import annotations


def image_processor_class(torchvision_class: str, backend: str):
    """transformers' image processor `torchvision_class` for `backend`: "torchvision" (the class itself, what
    transformers picks when torchvision is installed; the test is skipped without it, as the class would fall
    back to the PIL one) or "pil" (its `...Pil` twin)."""
    import pytest
    import transformers

    if backend == "torchvision":
        pytest.importorskip("torchvision")
        return getattr(transformers, torchvision_class)
    return getattr(transformers, torchvision_class + "Pil")


def image_only_processor(processor_class, path, **kwargs):
    """`processor_class` over `path`'s tokenizer and the image processor AutoImageProcessor picks (torchvision's
    when it is installed, else the PIL one), with no video processor."""
    from transformers import AutoImageProcessor, AutoTokenizer

    class ImageOnly(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnly(image_processor=AutoImageProcessor.from_pretrained(path),
                     tokenizer=AutoTokenizer.from_pretrained(path), video_processor=None, **kwargs)
