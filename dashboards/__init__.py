"""The Node-RED dashboards (flows and the npm manifest), shipped as package data of
``fedmq.dashboards`` so that ``fedmq dashboards`` runs from a wheel as from this folder."""
