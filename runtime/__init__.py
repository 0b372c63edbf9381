"""The trainer the rendered scripts launch: prepare, train, checkpoint, export, evaluate. Reads only plan.json."""
