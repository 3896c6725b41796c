"""The `lazymoe` subcommands: argparse parsers and the functions they call."""
