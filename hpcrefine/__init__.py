"""hpcrefine: MPI-parallel real-space refinement of large atomic models against cryo-EM maps."""
__version__ = "0.1.0"
