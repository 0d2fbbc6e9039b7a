//! Flow records: the datapath's events and flow table turned into flows with an outcome.
