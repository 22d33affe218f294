"""The sparse kernels and how they are placed: the kernel plan chosen for the devices a program is
compiled for, top-k selection, the TopK gradient rules, row gathers/scatters (XLA or the native C++
CPU kernels), their per-shard forms on a latent-sharded mesh, the mesh itself, and the step's
floor for benchmarks."""
