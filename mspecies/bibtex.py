"""
@misc{mspecies2026,
  title = {mspecies: particle-set intersection and sub-tomogram export from tilt series for Scipion},
  author = {mspecies developers},
  journal = {Scipion plugin scipion-em-mspecies},
  year = {2026},
  url = {https://github.com/mspecies/scipion-em-mspecies}
}

@article{Tegunov2021,
  title = {Multi-particle cryo-EM refinement with M visualizes ribosome-antibiotic complex at 3.5 A in cells},
  author = {Tegunov, Dimitry and Xue, Liang and Dienemann, Christian and Cramer, Patrick and Mahamid, Julia},
  journal = {Nature Methods},
  volume = {18},
  pages = {186--193},
  year = {2021},
  doi = {10.1038/s41592-020-01054-7}
}
"""
