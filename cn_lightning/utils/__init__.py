"""Small shared utilities (checkpoint IO, logging helpers, resolvers)."""
