-- Argo CD health check for kubetune.io/ModelDeployment.
-- Install it as resource.customizations.health.kubetune.io_ModelDeployment in argocd-cm
-- (docs/install.md#argo-cd). It reads the conditions the kubetune operator writes (Ready
-- is the summary; Progressing mirrors the vLLM Deployment's):
--   Ready=True                        -> Healthy (what is served, where, replicas ready)
--   Ready reason ScaledToZero         -> Suspended (replicas 0, or autoscaled to zero)
--   Ready reason Deploying            -> Progressing (creating, rolling out, loading the model)
--   Ready=False, Progressing=Unknown  -> Progressing (waiting for a FineTuneJob or its run)
--   Ready=False otherwise             -> Degraded (a refused spec such as a failed gate or an
--                                        unservable adapter, a crash loop, an image that
--                                        cannot be pulled; the reason says which)
--   no status, an older generation    -> Progressing
local hs = {}

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function describe(c)
  local text = c.reason or ""
  if c.message ~= nil and c.message ~= "" then
    if text ~= "" then
      text = text .. ": "
    end
    text = text .. c.message
  end
  return text
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to report a status"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to observe generation " .. generation
  return hs
end

local ready = condition(status, "Ready")
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to report readiness"
  return hs
end
local progressing = condition(status, "Progressing")
if ready.status == "True" then
  hs.status = "Healthy"
elseif ready.reason == "ScaledToZero" then
  hs.status = "Suspended"
elseif ready.reason == "Deploying" or ready.status ~= "False" then
  hs.status = "Progressing"
elseif progressing ~= nil and progressing.status == "Unknown" then
  hs.status = "Progressing"
else
  hs.status = "Degraded"
end
hs.message = describe(ready)
return hs
