"""`ember bench`: llama-bench style measurements in-process (`local`) and a load generator for servers (`serving`).

`report` turns either result into a rich table, one JSON document or a PNG plot.
"""
