"""quantcli's tests: one folder per stage of the package, promises/ for guarantees that cross stages."""
