"""Lightning callbacks: sample grids, convergence tracking, throughput."""
