from moekit.cli import main

main()
