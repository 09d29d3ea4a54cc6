"""Protocol steps around the coordinate minimisation: rigid bodies, morphing, ADP refinement.

param.py   minimisation over a small parameter vector that generates the coordinates (serial or
           shared by the workers of an MPI run)
rigid.py   rigid-body parametrisation of groups; group specification
morph.py   smooth shift field from control points
adp.py     B-factor target (density fit) and its restraints
steps.py   the steps as a run executes them, and the protocol's grammar
"""
