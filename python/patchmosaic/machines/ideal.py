"""The ideal score machine (IS, eq. 3-4): a softmax over whole training images. It memorises."""

from .base import DATA_ARGS, ENGINE_ARGS, SOURCE_ARGS, Machine


class IS(Machine):
    __doc__ = """Ideal score machine: each query image attends to every training image, whole (values: the
    images). As ``t -> 0`` it returns the nearest training image. Queries have the training size.

    Args:
""" + DATA_ARGS + SOURCE_ARGS + ENGINE_ARGS

    local = False
