"""Training and evaluation data: blurry/sharp pairs on disk (``paired``), sharp photos degraded
on the fly (``degradations``, ``degraded``), and the synthetic blur kernels both use
(``synthetic_blur``)."""
