"""Experiments: sweeps over method x learning rate x batch size (and any config key), their reports, data
quality variants, and what each training method costs.

    grid       parse `key=values` axes, expand cells, name their folders
    sweep      plan and run cells resumably (in-process or `--jobs N` processes), one result.json per cell
    optimum    optimal lr on a grid (parabola refinement) and the ratio of two optima with its interval
    report     table, findings and plots regenerated from the recorded cells
    quality    the SFT corruption step, clean/noisy data variants, held-out accuracy and format compliance
    cost       analytic parameters / bytes / FLOPs per method, and measured peak memory and tokens/s
    lora_batch LoRA against full fine-tuning at large effective batches: two-stage lr, gaps with intervals
"""
