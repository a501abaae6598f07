"""AST training: distillation loss, the SR-STE optimizer step, engines and the loop."""
