"""Floor 3 of fc2conv: the command line, terminal reports and figures.

Thin: each subcommand parses its arguments, calls one public function, prints the result.
"""
