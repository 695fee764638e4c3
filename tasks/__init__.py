"""Applications built on the bbzo engine (installed as ``bbzo.tasks``)."""
