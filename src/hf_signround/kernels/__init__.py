"""Compute kernels for packed low-bit linear layers.

* ``reference.py``      -- the pure-torch definition every kernel must reproduce (and the
                           ``"torch"`` backend);
* ``triton_kernels.py`` -- the ``@triton.jit`` kernels (decode GEMV, split-K / tiled GEMM)
                           and their candidate launch configs;
* ``triton_launch.py``  -- checks, kernel and config choice, workspace, launch;
* ``backend.py``        -- the backend switch (``"auto"``, ``"triton"``, ``"torch"``,
                           ``HF_SIGNROUND_BACKEND``) and the ``hf_signround::quant_linear``
                           custom op that ``torch.compile`` sees.

Only ``backend.py`` looks for Triton; the Triton modules are imported on first use.
"""
