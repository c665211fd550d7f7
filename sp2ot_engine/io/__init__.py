"""Images and tables in and out of the engine.

==============================  =================================================  ============
module                          what                                               needs
==============================  =================================================  ============
``archive``                     folder/archive rules and the manifest (no decode)  stdlib, Pillow
``collection``                  ``scan_images``, ``ImageCollection``               Pillow
``decode``                      bytes -> RGB PIL image                             Pillow
``loader``                      torch ``Dataset`` / ``DataLoader`` over images     torch
``labels_csv``                  labels and truth CSV files                         stdlib
==============================  =================================================  ============

This package imports nothing on its own, so ``sp2ot_engine.io.archive`` and
``sp2ot_engine.io.labels_csv`` can be used by a process that must not load torch.
"""
