"""The ideal score machine (IS, eq. 3-4): a softmax over whole training images. It memorises."""

from .base import Machine


class IS(Machine):
    """Ideal score machine: each query image attends to every training image, whole (values: the images).
    As ``t -> 0`` it returns the nearest training image. Arguments as :class:`Machine`."""

    local = False
