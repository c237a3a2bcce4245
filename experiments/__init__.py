"""The scripts behind the tables of docs/ (ablations, recipe searches, the reconstruction floor, the photo benchmark);
speed and memory scripts that print same-run ratios live in benchmarks/."""
