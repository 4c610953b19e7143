"""Device profiles, host runtimes (eager, ExecuTorch, llama.cpp) and the evaluator."""
