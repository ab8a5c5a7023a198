"""The MLX wrapper: a management API that runs `mlx_lm.server` processes on demand."""
