"""Geometry shared by every stage: boxes (torch), masks and RLEs (numpy / pycocotools), image grids."""
