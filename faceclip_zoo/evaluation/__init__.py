"""Evaluation: `evaluate` (benchmark specs -> generated images -> Face Sim, CLIP-T, FID,
contact sheets), encoder zero-shot and t-SNE, the miniature ablation (`ablation`), and the
synthetic world's pixel-level metrics."""
