"""The study "Does FNE eliminate false negatives?": `data` (the real sets and their cached frozen-tower features),
`run` (every objective on them, seeds paired), `report` (tables, CSVs, plots).  `python -m fne_dist.study` runs it."""
