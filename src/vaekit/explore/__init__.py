"""The web explorer behind `vaekit explore RUN_DIR`: a thin FastAPI server (server.py) over
`latent_space.LatentSpace`, and one static page (static/) with no build step.

Needs the optional extra: pip install 'vaekit[explore]'. Nothing here is imported by the library.
"""
