"""What every stage needs: config parsing, the checkpoint contract, model loading."""
