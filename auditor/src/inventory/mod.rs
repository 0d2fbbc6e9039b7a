//! Who is who: pods, nodes, services and entities by address, loaded from files or the API.
