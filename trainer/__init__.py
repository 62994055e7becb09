"""The OPD trainer: config, routing to teachers, score cache, Uni-OPD math, the loop; built in the trainer issue."""
