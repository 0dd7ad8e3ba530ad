from sbrender.cli import main

main(prog_name="sbrender")
