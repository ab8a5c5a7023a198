"""The OpenAI Responses API (`POST /v1/responses`), translated in the wrapper's relay.

`request` checks a Responses body and turns it into the OpenAI chat request
`mlx_lm.server` serves; `tools` says, once per tool kind, how a tool is offered to the
model and how its call and output travel; `events` turns the model server's chat chunks
into Responses stream events (a non-streamed answer is the last event's response);
`store` keeps responses for `previous_response_id` and `GET /v1/responses/{id}`.
"""
