"""PaDT supervised fine-tuning. Run it with `python -m padt.train [--config file.yaml] [--flag value ...]`.

How the loss is assembled, outermost first (each module's first docstring line says what it holds):
`run` (entry point: parse, build, train, save) -> `arguments` (the flags) -> `build` (model, processor, freezing, data;
LoRA in `lora`) -> `trainer.PaDTTrainer.compute_loss` -> `step.compute_padt_loss` (one batch: forward, decoder) ->
`criterion.PaDTCriterion` (names and weighs every term, `auxiliary` ones included) -> `losses` (the functional terms;
`row_cross_entropy` is the CE's fp32 kernel). `checkpoints` reads saved weights (resume, LoRA merge).
"""
