"""The phone app: a web app (PWA) that runs a run's top three models in the browser.

``guard`` fits the out-of-distribution guard, ``bundle`` writes the static bundle under
``runs/<run id>/app/``, ``serve`` serves a bundle on loopback (``make app``).
"""
