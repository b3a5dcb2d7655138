"""An expert reader study: a blinded kit a radiologist opens in a browser, and the scoring of their answers.

``items`` picks the images (real test images and each branch's generations), ``kit`` writes the blinded
kit and its answer key, ``page/`` is the web page of the kit, ``responses`` checks the readers' exported
files, ``scoring`` turns them into metrics and report lines. ``browser`` and ``screenshot`` drive a
headless Chromium (tests and the documentation figure).
"""
