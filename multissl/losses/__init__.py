"""Pure tensor losses the libraries lack, one a module, distributed-aware, each tested against a slow
hand-written reference."""
