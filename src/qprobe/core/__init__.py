"""The bottom layer: data types every layer passes around (`qprobe.core.types`) and the one atomic
file writer (`qprobe.core.files`). It imports nothing of qprobe but `qprobe.errors`."""
